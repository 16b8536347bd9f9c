//! Minimal protobuf wire format: the few messages we speak (dag-pb nodes,
//! UnixFS data, bitswap messages) are small and fixed, so a hand-written
//! encoder and a zero-copy field reader replace a code generator.

/// Why a protobuf buffer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PbError {
    /// The buffer ended inside a varint, tag or length-delimited field.
    #[error("truncated protobuf at byte {offset}")]
    Truncated { offset: usize },
    /// A varint was longer than 10 bytes.
    #[error("varint longer than 64 bits at byte {offset}")]
    VarintOverflow { offset: usize },
    /// A field used a wire type we never accept (groups, or an unknown one).
    #[error("unsupported wire type {wire_type} for field {field}")]
    WireType { field: u64, wire_type: u8 },
    /// A known field carried the wrong wire type.
    #[error("field {field} has the wrong wire type")]
    FieldType { field: u64 },
}

/// One decoded field value; byte fields borrow from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Value<'a> {
    /// The varint payload of `field`, or a typed error.
    pub fn varint(self, field: u64) -> Result<u64, PbError> {
        match self {
            Value::Varint(v) => Ok(v),
            _ => Err(PbError::FieldType { field }),
        }
    }

    /// The length-delimited payload of `field`, or a typed error.
    pub fn bytes(self, field: u64) -> Result<&'a [u8], PbError> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err(PbError::FieldType { field }),
        }
    }
}

/// Appends an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Number of bytes `put_varint` writes for `v`.
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Reads a varint at `*pos`, advancing it.
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, PbError> {
    let start = *pos;
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos).ok_or(PbError::Truncated { offset: *pos })?;
        *pos += 1;
        if i == 9 && b > 1 {
            return Err(PbError::VarintOverflow { offset: start });
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(PbError::VarintOverflow { offset: start })
}

/// Appends a varint field (wire type 0).
pub fn put_uint(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

/// Appends a length-delimited field (wire type 2).
pub fn put_bytes(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// Encoded size of a length-delimited field carrying `len` bytes.
pub fn bytes_field_len(field: u64, len: usize) -> usize {
    varint_len((field << 3) | 2) + varint_len(len as u64) + len
}

/// Iterates over the fields of one message, in wire order.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0 }
    }

    fn read(&mut self) -> Result<(u64, Value<'a>), PbError> {
        let key = get_varint(self.buf, &mut self.pos)?;
        let field = key >> 3;
        let wire_type = (key & 7) as u8;
        let value = match wire_type {
            0 => Value::Varint(get_varint(self.buf, &mut self.pos)?),
            1 => Value::Fixed64(u64::from_le_bytes(self.take_array::<8>()?)),
            2 => {
                let len = get_varint(self.buf, &mut self.pos)?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| self.pos.checked_add(l))
                    .filter(|&end| end <= self.buf.len())
                    .ok_or(PbError::Truncated { offset: self.pos })?;
                let v = &self.buf[self.pos..end];
                self.pos = end;
                Value::Bytes(v)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take_array::<4>()?)),
            _ => return Err(PbError::WireType { field, wire_type }),
        };
        Ok((field, value))
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], PbError> {
        let end = self.pos + N;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(PbError::Truncated { offset: self.pos })?;
        self.pos = end;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), PbError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let item = self.read();
        if item.is_err() {
            self.pos = self.buf.len();
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_len_matches_encoding() {
        for v in [0, 1, 127, 128, 16383, 16384, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "value {v}");
        }
    }

    #[test]
    fn rejects_truncated_length_delimited_field() {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, b"hello");
        out.pop();
        let got: Result<Vec<_>, _> = Fields::new(&out).collect();
        assert!(matches!(got, Err(PbError::Truncated { .. })));
    }

    #[test]
    fn rejects_overlong_varint() {
        let buf = [0xffu8; 11];
        assert!(matches!(
            get_varint(&buf, &mut 0),
            Err(PbError::VarintOverflow { .. })
        ));
    }

    #[test]
    fn rejects_group_wire_type() {
        let buf = [(1 << 3) | 3];
        let got: Result<Vec<_>, _> = Fields::new(&buf).collect();
        assert_eq!(
            got,
            Err(PbError::WireType {
                field: 1,
                wire_type: 3
            })
        );
    }

    proptest! {
        #[test]
        fn varint_round_trips(v in any::<u64>()) {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut pos = 0;
            prop_assert_eq!(get_varint(&out, &mut pos), Ok(v));
            prop_assert_eq!(pos, out.len());
        }

        #[test]
        fn fields_round_trip(fields in proptest::collection::vec(
            (1u64..1000, prop_oneof![
                any::<u64>().prop_map(Ok),
                proptest::collection::vec(any::<u8>(), 0..40).prop_map(Err),
            ]), 0..10)) {
            let mut out = Vec::new();
            for (f, v) in &fields {
                match v {
                    Ok(n) => put_uint(&mut out, *f, *n),
                    Err(b) => put_bytes(&mut out, *f, b),
                }
            }
            let parsed: Vec<_> = Fields::new(&out).collect::<Result<_, _>>().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(parsed.len(), fields.len());
            for ((f, v), (pf, pv)) in fields.iter().zip(parsed) {
                prop_assert_eq!(*f, pf);
                match v {
                    Ok(n) => prop_assert_eq!(pv, Value::Varint(*n)),
                    Err(b) => prop_assert_eq!(pv, Value::Bytes(b.as_slice())),
                }
            }
        }
    }
}
