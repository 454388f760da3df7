//! `/hook/set-status` bodies: no panic; an accepted body's fields are what
//! the contract allows, and they are read from the JSON as written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbroker::fuzz_api::{parse_hook_signal, HookError, Status};

fuzz_target!(|data: &[u8]| {
    let mut body = data.to_vec();
    match parse_hook_signal(&mut body) {
        Ok(signal) => {
            assert!(!signal.cwd.is_empty());
            assert_eq!(Status::parse(signal.status.as_str()), Some(signal.status));
            // A body that parsed is JSON; it parses again to the same signal.
            let mut again = data.to_vec();
            assert_eq!(parse_hook_signal(&mut again), Ok(signal));
        }
        Err(HookError::UnknownStatus(echo)) => assert!(echo.len() <= 64),
        Err(err) => assert_eq!(err.status(), 400),
    }
});
