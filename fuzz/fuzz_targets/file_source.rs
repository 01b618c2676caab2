//! The controller's file source: a manifest file's text (YAML or JSON, one document
//! or several) read as the controller reads it, and what it holds compiled into every
//! node's view as the controller compiles it. A bad file is an error that names its
//! line, a strange cluster a verdict; neither is a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use weft_api::config::v1::TrustBundle;
use weft_controller::{
    compile::{Settings, compile},
    objects::Objects,
    source::files::parse,
};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(parsed) = parse(Path::new("fuzz.yaml"), text) else {
        return;
    };
    let mut objects = Objects::default();
    for object in parsed {
        objects.upsert(object);
    }
    let compiled = compile(&objects, &Settings::default(), &TrustBundle::default());
    for node in compiled.local.keys() {
        let _ = compiled.view(node);
    }
});
