//! `weft-cni`: the binary the container runtime runs. Reads the CNI environment and
//! stdin, runs [`weft_cni::run`], prints the result or the CNI error object on stdout.
#![forbid(unsafe_code)]

use std::{io, process::ExitCode};

use weft_cni::{Env, UnixAgent};

fn main() -> ExitCode {
    match weft_cni::run(&Env::from_process(), &mut io::stdin().lock(), &UnixAgent) {
        Ok(success) => {
            if let Some(warning) = success.warning {
                eprintln!("{warning}");
            }
            if let Some(result) = success.result {
                println!("{result}");
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            println!("{}", failure.error.to_json(&failure.cni_version));
            ExitCode::FAILURE
        }
    }
}
