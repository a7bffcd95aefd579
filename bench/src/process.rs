//! Processes the harness starts: each runs in its own process group, optionally pinned to CPUs
//! with `taskset`, and is stopped through its process group when dropped, also on errors and
//! after Ctrl-C.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

use crate::procfs;

/// Time a process group gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A started process and the process group it leads.
pub struct ChildProcess {
    name: String,
    child: std::process::Child,
    log_path: PathBuf,
    stopped: bool,
}

impl ChildProcess {
    /// Starts `program` with `args` and `env` as the leader of a new process group, with stdout
    /// and stderr appended to `log_path`. With `cpus`, runs it under `taskset -c CPUS`, which
    /// sets the affinity and then executes the program in the same process.
    ///
    /// # Errors
    /// Fails when the log file cannot be created or the program cannot be started.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        cpus: Option<&str>,
        log_path: &Path,
    ) -> anyhow::Result<Self> {
        let log = File::create(log_path)
            .with_context(|| format!("creating the log file {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("opening {} for stderr", log_path.display()))?;
        let mut command = match cpus {
            Some(cpus) => {
                let mut command = Command::new("taskset");
                command.arg("-c").arg(cpus).arg(program);
                command
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // A group of its own keeps terminal Ctrl-C away from the child, so that the harness
        // decides when and how it stops, and lets one signal reach all of its workers.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log_path: log_path.to_owned(),
            stopped: false,
        })
    }

    /// Returns the process group id, which equals the leader's pid.
    pub fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// Returns a description of the exit when the leader has exited.
    pub fn exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// Returns the last `lines` lines of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends SIGTERM to the process group, waits up to 5 s for the leader, then sends SIGKILL
    /// to whatever is left of the group.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pgid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = killpg(pgid, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Worker processes can outlive their leader; nothing of the group may stay behind.
        if self.child.try_wait().ok().flatten().is_none()
            || !procfs::group_members(self.child.id()).is_empty()
        {
            eprintln!(
                "bench: {} did not stop after SIGTERM; sending SIGKILL",
                self.name
            );
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
