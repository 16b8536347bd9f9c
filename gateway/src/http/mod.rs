//! What we serve over HTTP: the Nix binary cache, the trustless gateway,
//! Routing V1, uploads from `nix copy`, the status page, and the local admin API. Handlers parse the
//! request, call one function of a lower layer, and map its result.
pub mod admin;
pub mod cache;
pub mod ipns;
pub mod page;
pub mod prefetch;
pub mod routing;
pub mod server;
pub mod trustless;
pub mod upload;
pub mod watchdog;
