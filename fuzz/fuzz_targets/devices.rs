//! Each device's request handling (blk, net, console, rng) with resets
//! between requests: see `kickvm_fuzz::devices`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: kickvm_fuzz::devices::DevInput| {
    kickvm_fuzz::devices::run(&input);
});
