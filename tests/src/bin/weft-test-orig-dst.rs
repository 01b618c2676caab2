//! Stands in for the agent's outbound proxy in the datapath tests: listens where
//! capture sends connections and answers each with the original destination the kernel
//! programs recorded for it (`ip:port`, or `unknown`), then closes.
//!
//! Usage: `weft-test-orig-dst <node bpffs dir> <listen address>`

use std::{io::Write as _, net::TcpListener, path::PathBuf};

use weft_agent::datapath::{Pins, pinned};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(bpffs), Some(listen)) = (args.next(), args.next()) else {
        eprintln!("usage: weft-test-orig-dst <node bpffs dir> <listen address>");
        std::process::exit(2);
    };
    let pins = Pins::new(PathBuf::from(bpffs));
    let listener = TcpListener::bind(&listen).unwrap_or_else(|err| panic!("bind {listen}: {err}"));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let answer = match pinned::take_original_destination(&pins, peer) {
            Ok(Some(destination)) => destination.to_string(),
            Ok(None) => "unknown".to_owned(),
            Err(err) => format!("error: {err}"),
        };
        eprintln!("{peer} -> {answer}");
        let _ = writeln!(stream, "{answer}");
    }
}
