//! CPU time and memory of processes, read from `/proc/PID/stat` and `/proc/PID/status`.

use std::{fmt, path::Path, process::Command, time::Duration};

/// Fields of one `/proc/PID/stat` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    /// Executable name, as the kernel truncates it (at most 15 bytes).
    pub comm: String,
    pub ppid: u32,
    pub pgrp: u32,
    /// CPU time in user mode of all threads, in clock ticks.
    pub utime_ticks: u64,
    /// CPU time in kernel mode of all threads, in clock ticks.
    pub stime_ticks: u64,
}

/// A `/proc` file that does not have the expected layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcParseError(String);

impl fmt::Display for ProcParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid /proc data: {}", self.0)
    }
}

impl std::error::Error for ProcParseError {}

/// Parses the text of `/proc/PID/stat`.
///
/// The command name sits in parentheses and may itself contain spaces and `)`, so the fields
/// after it are found from the last `)`.
///
/// # Errors
/// Fails when the parentheses or a numeric field are missing.
pub fn parse_stat(text: &str) -> Result<ProcStat, ProcParseError> {
    let open = text
        .find('(')
        .ok_or_else(|| ProcParseError("stat has no '('".to_owned()))?;
    let close = text
        .rfind(')')
        .ok_or_else(|| ProcParseError("stat has no ')'".to_owned()))?;
    if close < open {
        return Err(ProcParseError("stat has ')' before '('".to_owned()));
    }
    let pid = parse_field(text[..open].trim(), "pid")?;
    let comm = text[open + 1..close].to_owned();
    // Fields after the command name, from field 3 (state) on, numbered as in proc_pid_stat(5).
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |index: usize, name: &str| -> Result<u64, ProcParseError> {
        let value = rest
            .get(index)
            .ok_or_else(|| ProcParseError(format!("stat has no {name} field")))?;
        parse_field(value, name)
    };
    Ok(ProcStat {
        pid: u32::try_from(pid).map_err(|_| ProcParseError(format!("pid {pid}")))?,
        comm,
        ppid: u32::try_from(field(1, "ppid")?).unwrap_or(0),
        pgrp: u32::try_from(field(2, "pgrp")?).unwrap_or(0),
        utime_ticks: field(11, "utime")?,
        stime_ticks: field(12, "stime")?,
    })
}

fn parse_field(value: &str, name: &str) -> Result<u64, ProcParseError> {
    value
        .parse()
        .map_err(|_| ProcParseError(format!("{name} {value:?} is not a number")))
}

/// Parses the `VmRSS` line of `/proc/PID/status`, in KiB. Kernel threads have none.
pub fn parse_status_rss_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// CPU time and resident memory summed over a set of processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_ticks: u64,
    /// Sum of each process's RSS; pages shared between processes count once per process.
    pub rss_kib: u64,
    pub processes: usize,
}

/// Lists the pids of the live processes in process group `pgid`.
///
/// A proxy started in its own process group keeps its worker processes there (nginx), so the
/// group covers the whole proxy.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| read_stat(pid).is_some_and(|stat| stat.pgrp == pgid))
        .collect()
}

/// Reads the usage of `pids`. Processes that have exited are skipped.
pub fn usage_of(pids: &[u32]) -> Usage {
    let mut usage = Usage::default();
    for &pid in pids {
        let Some(stat) = read_stat(pid) else {
            continue;
        };
        usage.cpu_ticks += stat.utime_ticks + stat.stime_ticks;
        usage.rss_kib += read_rss_kib(pid).unwrap_or(0);
        usage.processes += 1;
    }
    usage
}

/// Reads the CPU ticks of the calling process (all its threads).
pub fn self_cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|text| parse_stat(&text).ok())
        .map_or(0, |stat| stat.utime_ticks + stat.stime_ticks)
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&text).ok()
}

fn read_rss_kib(pid: u32) -> Option<u64> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    parse_status_rss_kib(&text)
}

/// Clock ticks per second of the `/proc` CPU times, from `getconf CLK_TCK`.
#[derive(Debug, Clone, Copy)]
pub struct ClockTicks(u64);

impl ClockTicks {
    /// Asks `getconf`, and falls back to 100, the value of `USER_HZ` on x86-64 and arm64 Linux.
    pub fn detect() -> Self {
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100);
        Self(ticks)
    }

    pub fn to_duration(self, ticks: u64) -> Duration {
        Duration::from_secs_f64(ticks as f64 / self.0 as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NGINX_WORKER: &str = "4242 (nginx) S 4241 4241 4241 0 -1 4194624 1520 0 0 0 731 288 0 0 20 0 1 0 12345 60000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";

    #[test]
    fn stat_fields_are_parsed() {
        let stat = parse_stat(NGINX_WORKER).unwrap();
        assert_eq!(stat.pid, 4242);
        assert_eq!(stat.comm, "nginx");
        assert_eq!(stat.ppid, 4241);
        assert_eq!(stat.pgrp, 4241);
        assert_eq!(stat.utime_ticks, 731);
        assert_eq!(stat.stime_ticks, 288);
    }

    #[test]
    fn comm_with_spaces_and_parens() {
        let text = NGINX_WORKER.replace("(nginx)", "(a) b (c))");
        let stat = parse_stat(&text).unwrap();
        assert_eq!(stat.comm, "a) b (c)");
        assert_eq!(stat.utime_ticks, 731);
    }

    #[test]
    fn truncated_stat_is_error() {
        let err = parse_stat("1 (init) S 0 1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid /proc data: stat has no utime field"
        );
    }

    #[test]
    fn status_rss_is_parsed() {
        let text = "Name:\tnginx\nVmPeak:\t  20000 kB\nVmRSS:\t    5120 kB\nThreads:\t1\n";
        assert_eq!(parse_status_rss_kib(text), Some(5120));
    }

    #[test]
    fn kernel_thread_has_no_rss() {
        assert_eq!(
            parse_status_rss_kib("Name:\tkworker/0:1\nThreads:\t1\n"),
            None
        );
    }

    #[test]
    fn own_process_uses_cpu_and_memory() {
        let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert_eq!(stat.pid, std::process::id());
        let rss = read_rss_kib(std::process::id()).unwrap();
        assert!(rss > 0);
    }
}
