//! `corral::fuzzing::dhcp`: see its doc comment for the input format and what is asserted. The same entry
//! replays the committed corpus in tests/fuzz_corpora.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| corral::fuzzing::dhcp(data));
