//! The kernel loader over arbitrary bzImage files: see `kickvm_fuzz::bz`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: kickvm_fuzz::bz::BzInput| {
    kickvm_fuzz::bz::run(&input);
});
