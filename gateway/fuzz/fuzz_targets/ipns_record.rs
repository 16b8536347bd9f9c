//! Fuzzes IPNS record verification (records come from the DHT, routers and
//! Routing V1 PUTs): any bytes under a fixed name must be refused or
//! verified, never panic; a record that verifies must say the same thing
//! when verified again (no state, no partial parse). The seed record in
//! seeds/ipns_record was made by the `ipns` npm package for this name.
#![no_main]

use gateway::store::ipfs::ipns::{verify, IpnsName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let name: IpnsName = "k51qzi5uqu5djejcj9das04p3wen7mowcz0z5iq3tw0yxaa8ko01odjley7fdg"
        .parse()
        .expect("a valid name");
    if let Ok(first) = verify(&name, data, 0) {
        assert_eq!(verify(&name, data, 0).ok(), Some(first));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<IpnsName>();
    }
});
