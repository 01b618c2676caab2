//! The route matcher's regular expressions (`RegularExpression` path and header
//! matches): an expression from a route, then a value from a request, split at the
//! first NUL. A pattern either compiles or is refused, and matching never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_api::routes::Pattern;

fuzz_target!(|input: &[u8]| {
    let Ok(input) = std::str::from_utf8(input) else {
        return;
    };
    let (expression, value) = input.split_once('\0').unwrap_or((input, ""));
    if let Ok(pattern) = Pattern::new(expression) {
        assert_eq!(pattern.as_str(), expression);
        let _ = pattern.is_match(value);
    }
});
