//! What the index keeps of IPNS names: per name, the newest record this
//! gateway accepted (its own published ones, ones it resolved, ones PUT to
//! its Routing V1 endpoint). The record's sequence is the floor below which
//! no later answer for that name is believed, as set versions are for
//! mapping sets, so a replayed older record is refused even after a
//! restart. Records are checked by the caller before they come here; this
//! table only orders them.
//!
//! Table `ipns_records`: name (k51…) → sequence, validity, whether we
//! publish it, and the record bytes.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{decode, encode, Index, IndexError};

const IPNS_RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("ipns_records");
/// Most names kept for others (Routing V1 PUTs, resolved names); our own
/// always fit.
pub const MAX_NAMES: u64 = 100_000;

/// Creates this module's table (at [`Index::open`]).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), IndexError> {
    txn.open_table(IPNS_RECORDS)?;
    Ok(())
}

/// A verified IPNS record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRecord {
    pub sequence: u64,
    /// End of validity, Unix seconds.
    pub validity: u64,
    /// This gateway publishes it (republished while serving).
    pub own: bool,
    /// The record as signed, protobuf-encoded.
    pub record: Vec<u8>,
}

/// What became of a record offered to [`Index::offer_name_record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offered {
    /// It is now the stored record.
    Stored,
    /// The stored record is this one, or as new with a later validity.
    Kept,
    /// Its sequence is below the highest seen: a replay or a rollback.
    Older { highest: u64 },
    /// The table is full of others' names.
    Full,
}

impl Index {
    /// The stored record for `name`, if any.
    pub fn name_record(&self, name: &str) -> Result<Option<NameRecord>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IPNS_RECORDS)?;
        let Some(value) = table.get(name)? else {
            return Ok(None);
        };
        decode("ipns_records", name, value.value()).map(Some)
    }

    /// Offers a verified record: stored when its (sequence, validity) is
    /// above the stored one's; refused as [`Offered::Older`] when its
    /// sequence is lower. `own` sticks once set.
    pub fn offer_name_record(&self, name: &str, offer: NameRecord) -> Result<Offered, IndexError> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let mut table = txn.open_table(IPNS_RECORDS)?;
            let held: Option<NameRecord> = table
                .get(name)?
                .map(|v| decode("ipns_records", name, v.value()))
                .transpose()?;
            match held {
                Some(held) if offer.sequence < held.sequence => Offered::Older {
                    highest: held.sequence,
                },
                Some(held)
                    if (offer.sequence, offer.validity) <= (held.sequence, held.validity) =>
                {
                    if offer.own && !held.own {
                        let held = NameRecord { own: true, ..held };
                        table.insert(name, encode(&held).as_slice())?;
                    }
                    Offered::Kept
                }
                Some(held) => {
                    let offer = NameRecord {
                        own: offer.own || held.own,
                        ..offer
                    };
                    table.insert(name, encode(&offer).as_slice())?;
                    Offered::Stored
                }
                None if !offer.own && table.len()? >= MAX_NAMES => Offered::Full,
                None => {
                    table.insert(name, encode(&offer).as_slice())?;
                    Offered::Stored
                }
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// The records this gateway publishes, by name.
    pub fn own_name_records(&self) -> Result<Vec<(String, NameRecord)>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IPNS_RECORDS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (name, value) = entry?;
            let record: NameRecord = decode("ipns_records", name.value(), value.value())?;
            if record.own {
                out.push((name.value().to_owned(), record));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sequence: u64, validity: u64, own: bool) -> NameRecord {
        NameRecord {
            sequence,
            validity,
            own,
            record: vec![sequence as u8, validity as u8],
        }
    }

    #[test]
    fn the_highest_sequence_wins_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let index = Index::open(&path).unwrap();
        assert_eq!(
            index
                .offer_name_record("k51a", record(2, 10, false))
                .unwrap(),
            Offered::Stored
        );
        assert_eq!(
            index
                .offer_name_record("k51a", record(2, 10, false))
                .unwrap(),
            Offered::Kept
        );
        assert_eq!(
            index
                .offer_name_record("k51a", record(2, 11, false))
                .unwrap(),
            Offered::Stored
        );
        drop(index);
        let index = Index::open(&path).unwrap();
        assert_eq!(
            index
                .offer_name_record("k51a", record(1, 99, false))
                .unwrap(),
            Offered::Older { highest: 2 }
        );
        assert_eq!(
            index.name_record("k51a").unwrap(),
            Some(record(2, 11, false))
        );
        assert_eq!(index.name_record("k51b").unwrap(), None);
    }

    #[test]
    fn own_records_are_listed_and_stay_own() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        index
            .offer_name_record("k51own", record(1, 5, true))
            .unwrap();
        index
            .offer_name_record("k51own", record(2, 5, false))
            .unwrap();
        index
            .offer_name_record("k51other", record(1, 5, false))
            .unwrap();
        let own = index.own_name_records().unwrap();
        assert_eq!(own, vec![("k51own".to_owned(), record(2, 5, true))]);
    }
}
