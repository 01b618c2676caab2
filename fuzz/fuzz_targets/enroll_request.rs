//! The enrollment protocol: the request line the CNI plugin sends the agent's socket,
//! read as the agent reads it. What reads must write back and read the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_api::enroll::Request;

fuzz_target!(|line: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<Request>(line) {
        let written = serde_json::to_vec(&request).expect("a request writes");
        let again: Request = serde_json::from_slice(&written).expect("what was written reads");
        assert_eq!(again, request);
    }
});
