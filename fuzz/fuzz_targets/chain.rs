//! The descriptor chain walker over arbitrary guest memory and tables: see
//! `kickvm_fuzz::chain`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: kickvm_fuzz::chain::ChainInput| {
    kickvm_fuzz::chain::run(&input);
});
