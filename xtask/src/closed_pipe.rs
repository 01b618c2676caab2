//! Output to a closed pipe ends a task quietly, as it ends a Unix tool:
//! `cargo xtask cluster status --name a | head` prints its lines and stops, without a
//! panic message.
//!
//! `println!` and `eprintln!` panic when their stream is a pipe nobody reads any more.
//! That panic still unwinds, so what a task holds is released on the way out, but it
//! prints nothing, and stdout and stderr then point at /dev/null so that nothing
//! printed while unwinding panics a second time. The exit status is the one a shell
//! shows for a process that SIGPIPE ended: 141.

use std::{
    any::Any,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    panic::{self, AssertUnwindSafe},
};

/// 128 + SIGPIPE.
const EXIT_STATUS: i32 = 141;

/// Runs `task`, ending the process quietly if it writes to a closed pipe.
pub fn quietly(task: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let report = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if info.payload_as_str().is_some_and(is_closed_pipe) {
            silence();
        } else {
            report(info);
        }
    }));
    match panic::catch_unwind(AssertUnwindSafe(task)) {
        Ok(result) => result,
        Err(payload) if message(&*payload).is_some_and(is_closed_pipe) => {
            std::process::exit(EXIT_STATUS)
        }
        Err(payload) => panic::resume_unwind(payload),
    }
}

fn message(payload: &(dyn Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// Whether a panic message is the one `print!` or `eprint!` raise on a closed pipe
/// ("failed printing to stdout: Broken pipe (os error 32)").
fn is_closed_pipe(message: &str) -> bool {
    let broken_pipe = io::Error::from_raw_os_error(libc::EPIPE).to_string();
    message.starts_with("failed printing to std") && message.ends_with(&broken_pipe)
}

/// Points stdout and stderr at /dev/null.
fn silence() {
    let Ok(null) = File::options().write(true).open("/dev/null") else {
        return;
    };
    for stream in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 only replaces the descriptor `stream` with a copy of `null`,
        // which is open for the whole call; std's handles keep using the number.
        unsafe { libc::dup2(null.as_raw_fd(), stream) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_panic_of_printing_to_a_closed_pipe() {
        let epipe = io::Error::from_raw_os_error(libc::EPIPE);
        assert!(is_closed_pipe(&format!(
            "failed printing to stdout: {epipe}"
        )));
        assert!(is_closed_pipe(&format!(
            "failed printing to stderr: {epipe}"
        )));
        let other = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(!is_closed_pipe(&format!(
            "failed printing to stdout: {other}"
        )));
        assert!(!is_closed_pipe(&format!("cluster a: {epipe}")));
    }
}
