//! Validation of weft's custom resources, as the controller validates what the API
//! server or a manifest file holds: a spec in YAML (the first byte picks the kind)
//! either compiles or is refused with a field error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_api::crd::{
    AuthorizationPolicySpec, PeerAuthenticationSpec, TrafficPolicySpec, Validate,
};

fn validated<T: serde::de::DeserializeOwned + Validate>(yaml: &[u8]) -> Option<T> {
    let spec: T = serde_yaml::from_slice(yaml).ok()?;
    spec.validate().ok().map(|()| spec)
}

fuzz_target!(|input: &[u8]| {
    let Some((&kind, yaml)) = input.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            if let Some(policy) = validated::<AuthorizationPolicySpec>(yaml) {
                let _ = policy.compile("default", "fuzz", false);
            }
        }
        1 => {
            validated::<PeerAuthenticationSpec>(yaml);
        }
        _ => {
            validated::<TrafficPolicySpec>(yaml);
        }
    }
});
