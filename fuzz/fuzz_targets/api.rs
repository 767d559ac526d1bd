//! `kickvm --api-socket`'s request parsing and handling: see `kickvm_fuzz::api`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kickvm_fuzz::api::run(data);
});
