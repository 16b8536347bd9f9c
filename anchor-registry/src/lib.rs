//! What is true and who says so. Pure: no network, no async runtime, no global
//! state, so every decision about trust can be unit- and property-tested.
