//! Process helpers shared by the end-to-end test binaries: locating the built binaries and
//! running a child process with its output collected.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Wait for a child's ready line, and for it to exit after SIGTERM.
const PROCESS_LIMIT: Duration = Duration::from_secs(30);

/// Returns the path of a workspace binary next to the running test binary.
pub fn binary(name: &str) -> PathBuf {
    // target/debug/deps/TEST-HASH -> target/debug/NAME
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p edge -p agent`",
        path.display()
    );
    path
}

/// A child process with its output lines (stdout and stderr) collected.
pub struct Process {
    pub child: Child,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `cmd` and waits until an output line contains `ready`; returns that line.
    pub fn spawn(cmd: &mut Command, ready: &str) -> (Process, String) {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for stream in streams {
            let logs = logs.clone();
            let tx = tx.clone();
            let ready = ready.to_owned();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if line.contains(&ready) {
                        let _ = tx.send(line.clone());
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let Ok(line) = rx.recv_timeout(PROCESS_LIMIT) else {
            let _ = child.kill();
            panic!(
                "{cmd:?} timed out before printing its ready line; output:\n{}",
                logs.lock().unwrap().join("\n")
            );
        };
        (Process { child, logs }, line)
    }

    /// Counts the output lines that contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Returns the output so far, lines joined by newlines.
    pub fn output(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on the PID of a child this test spawned and has not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + PROCESS_LIMIT;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("process did not exit within {PROCESS_LIMIT:?} after SIGTERM");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
