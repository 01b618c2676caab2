//! The configuration stream's routes, as an agent reads them: a protobuf
//! `weft.config.v1.ServiceRoutes` decoded and checked entry by entry, then a request
//! routed by it. A message is refused or kept whole; what is kept writes back to the
//! same routes; selecting a rule and a backend by weight never panics.
#![no_main]

use libfuzzer_sys::{arbitrary::Unstructured, fuzz_target};
use prost::Message;
use weft_api::config::v1 as proto;
use weft_api::routes::{Request, ServiceRoutes};

fuzz_target!(|input: &[u8]| {
    let mut input = Unstructured::new(input);
    let Ok(wire) = input.arbitrary::<&[u8]>() else {
        return;
    };
    let Ok(wire) = proto::ServiceRoutes::decode(wire) else {
        return;
    };
    let Ok(routes) = ServiceRoutes::try_from(&wire) else {
        return;
    };
    let again = ServiceRoutes::try_from(&proto::ServiceRoutes::from(&routes))
        .expect("routes an agent kept write back as routes it keeps");
    assert_eq!(again, routes);

    let (Ok(namespace), Ok(method), Ok(path), Ok(query), Ok(headers), Ok(point)) = (
        input.arbitrary::<&str>(),
        input.arbitrary::<&str>(),
        input.arbitrary::<&str>(),
        input.arbitrary::<Option<&str>>(),
        input.arbitrary::<Vec<(String, String)>>(),
        input.arbitrary::<u64>(),
    ) else {
        return;
    };
    let request = Request {
        method,
        path,
        query,
        headers: &headers,
    };
    if let Some(selected) = routes.select(namespace, &request) {
        let total = selected.rule.total_weight();
        if total > 0 {
            assert!(selected.rule.backend_at(point % total).is_some());
        }
    }
});
