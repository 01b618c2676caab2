//! The configuration stream's authorization policies, as an agent reads them: a
//! protobuf `weft.config.v1.AuthorizationPolicy` decoded and checked, then a caller's
//! connection and request decided by it. A policy is refused or kept whole; what is
//! kept writes back to the same policy; a decision never panics and does not change
//! when asked again.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::{arbitrary::Unstructured, fuzz_target};
use prost::Message;
use weft_api::authz::{Caller, Policy, Request, Target, Traffic, evaluate};
use weft_api::config::v1 as proto;

fuzz_target!(|input: &[u8]| {
    let mut input = Unstructured::new(input);
    let Ok(wire) = input.arbitrary::<&[u8]>() else {
        return;
    };
    let Ok(wire) = proto::AuthorizationPolicy::decode(wire) else {
        return;
    };
    let Ok(policy) = Policy::try_from(&wire) else {
        return;
    };
    let again = Policy::try_from(&proto::AuthorizationPolicy::from(&policy))
        .expect("a policy an agent kept writes back as a policy it keeps");
    assert_eq!(again, policy);

    let (Ok(principal), Ok(caller_ip), Ok(target_ip), Ok(port)) = (
        input.arbitrary::<Option<&str>>(),
        input.arbitrary::<Option<[u8; 4]>>(),
        input.arbitrary::<[u8; 4]>(),
        input.arbitrary::<u16>(),
    ) else {
        return;
    };
    let (Ok(method), Ok(path), Ok(host), Ok(headers)) = (
        input.arbitrary::<&str>(),
        input.arbitrary::<&str>(),
        input.arbitrary::<&str>(),
        input.arbitrary::<Vec<(String, String)>>(),
    ) else {
        return;
    };
    let caller = Caller {
        principal,
        ip: caller_ip.map(IpAddr::from),
    };
    let target = Target {
        ip: IpAddr::from(target_ip),
        port,
    };
    let request = Request {
        method,
        path,
        host,
        headers: &headers,
    };
    let policies = [policy];
    for traffic in [Traffic::Unknown, Traffic::Tcp, Traffic::Http(request)] {
        let first = evaluate(&policies, &caller, target, traffic);
        let second = evaluate(&policies, &caller, target, traffic);
        assert_eq!(first.verdict, second.verdict);
    }
});
