//! A vhost-user back-end's handling of frontend messages over a real
//! socket: see `kickvm_fuzz::vhost_user`.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: kickvm_fuzz::vhost_user::VuInput| {
    kickvm_fuzz::vhost_user::run(&input);
});
