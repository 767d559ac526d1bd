//! `kickvm run`'s command line and option parsers: see `kickvm_fuzz::cli`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: kickvm_fuzz::cli::CliInput| {
    kickvm_fuzz::cli::run(&input);
});
