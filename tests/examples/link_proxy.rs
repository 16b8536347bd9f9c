//! A delayed link ([`e2e::link::Link`]) in front of one TCP address, for
//! shell benchmarks: prints the address it listens on, then relays until it
//! is killed.
//!
//! Usage: `link_proxy TARGET_ADDR ONE_WAY_DELAY_MS`

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use e2e::link::{Link, LinkConfig};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: link_proxy TARGET_ADDR ONE_WAY_DELAY_MS";
    let target: SocketAddr = args
        .next()
        .context(usage)?
        .parse()
        .context("TARGET_ADDR must be an address such as 127.0.0.1:8080")?;
    let delay_ms: u64 = args
        .next()
        .context(usage)?
        .parse()
        .context("ONE_WAY_DELAY_MS must be a whole number of milliseconds")?;
    let link = Link::start(
        target,
        LinkConfig::new(Duration::from_millis(delay_ms), None),
    )
    .with_context(|| format!("cannot start a link to {target}"))?;
    println!("{}", link.addr());
    loop {
        std::thread::park();
    }
}
