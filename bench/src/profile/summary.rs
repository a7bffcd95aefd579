//! The Markdown summary of a profile: samples in the kernel and in user space, the share of
//! named code paths, the functions with the most self samples, and the samples per thread.

use std::{collections::HashMap, fmt::Write as _};

use super::fold::{split_annotation, FoldedStacks, Space};
use crate::report::thousands;

/// Rows of each "top functions" table.
const TOP_FUNCTIONS: usize = 25;

/// A rule that matches a frame of a collapsed stack by its name without annotation.
#[derive(Debug, Clone, Copy)]
pub enum Matcher {
    /// A kernel frame with exactly this name.
    Kernel(&'static str),
    /// A user-space frame whose name starts with this text, for C symbols.
    UserPrefix(&'static str),
    /// A user-space frame whose name contains this text anywhere.
    UserContains(&'static str),
    /// A user-space frame that names an item under this Rust path, such as `ring::`, also
    /// inside `<… as …>`. The path must start a path in the name, so `ring::` does not match
    /// `monoio::driver::uring::`.
    UserPath(&'static str),
    /// Any rule of the list.
    AnyOf(&'static [Matcher]),
}

impl Matcher {
    fn matches(&self, name: &str, space: Space) -> bool {
        match *self {
            Self::Kernel(exact) => space == Space::Kernel && name == exact,
            Self::UserPrefix(prefix) => space == Space::User && name.starts_with(prefix),
            Self::UserContains(part) => space == Space::User && name.contains(part),
            Self::UserPath(path) => space == Space::User && names_path(name, path),
            Self::AnyOf(list) => list.iter().any(|m| m.matches(name, space)),
        }
    }

    /// Describes the rule for the summary, for example `` `tcp_sendmsg` [k] ``.
    fn describe(&self) -> String {
        match *self {
            Self::Kernel(exact) => format!("`{exact}` [k]"),
            Self::UserPrefix(prefix) => format!("`{prefix}…`"),
            Self::UserContains(part) => format!("`…{part}…`"),
            Self::UserPath(path) => format!("`{path}…`"),
            Self::AnyOf(list) => list
                .iter()
                .map(Matcher::describe)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Returns whether `name` contains `path` at the start of a path: at the start of the name
/// or after a character that cannot end a path segment, such as `<`, a space or `&`.
fn names_path(name: &str, path: &str) -> bool {
    name.match_indices(path).any(|(index, _)| {
        name[..index]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'))
    })
}

/// A code path whose share of samples the summary reports.
#[derive(Debug, Clone, Copy)]
pub struct NamedPath {
    pub name: &'static str,
    /// Frames a stack must contain, one matcher per step, each step called from the one
    /// before it (closer to the thread's start). One step means "contains a frame matching".
    pub steps: &'static [Matcher],
    /// Whether only samples taken in user space count. Kernel work under TLS frames is
    /// mostly the system call that writes the records, because OpenSSL's `BIO_write` sits in
    /// libcrypto, whose frames are `[libcrypto.so.3]` without debug symbols, like its AES code.
    pub user_space_only: bool,
}

impl NamedPath {
    /// Returns whether `frames` (outermost first) contain the steps in order, and, for a
    /// user-space path, end in user space.
    pub fn matches(&self, frames: &[String]) -> bool {
        if self.user_space_only
            && frames
                .last()
                .is_some_and(|leaf| split_annotation(leaf).1 == Space::Kernel)
        {
            return false;
        }
        let mut steps = self.steps.iter().peekable();
        for frame in frames {
            let Some(step) = steps.peek() else { break };
            let (name, space, _) = split_annotation(frame);
            if step.matches(name, space) {
                steps.next();
            }
        }
        steps.peek().is_none()
    }
}

const SOCKET_SENDS: Matcher = Matcher::AnyOf(&[
    Matcher::Kernel("sock_sendmsg"),
    Matcher::Kernel("tcp_sendmsg"),
    Matcher::Kernel("udp_sendmsg"),
    Matcher::Kernel("udpv6_sendmsg"),
]);

const SOCKET_RECEIVES: Matcher = Matcher::AnyOf(&[
    Matcher::Kernel("sock_recvmsg"),
    Matcher::Kernel("tcp_recvmsg"),
    Matcher::Kernel("udp_recvmsg"),
    Matcher::Kernel("udpv6_recvmsg"),
]);

const SOFTIRQ_RECEIVE: Matcher = Matcher::Kernel("net_rx_action");

/// Crypto primitives: ring and aws-lc (Rust), OpenSSL's libcrypto (nginx, HAProxy) and Go's
/// crypto packages (Traefik, Caddy).
const TLS_CRYPTO: Matcher = Matcher::AnyOf(&[
    Matcher::UserPath("ring::"),
    Matcher::UserPrefix("ring_core_"),
    Matcher::UserPath("aws_lc_rs::"),
    Matcher::UserPrefix("aws_lc_"),
    Matcher::UserPrefix("aesni_"),
    Matcher::UserPrefix("_aesni_"),
    Matcher::UserPrefix("aes_gcm_"),
    Matcher::UserPrefix("gcm_"),
    Matcher::UserPrefix("ChaCha20_"),
    Matcher::UserPrefix("Poly1305_"),
    Matcher::UserPrefix("poly1305_"),
    Matcher::UserPrefix("ecp_nistz256"),
    Matcher::UserPrefix("sha256_block"),
    Matcher::UserPrefix("sha512_block"),
    Matcher::UserPrefix("EVP_"),
    Matcher::UserPrefix("ossl_"),
    Matcher::UserPrefix("CRYPTO_"),
    Matcher::UserPrefix("[libcrypto"),
    Matcher::UserPrefix("crypto/aes"),
    Matcher::UserPrefix("crypto/cipher"),
    Matcher::UserPrefix("crypto/ecdsa"),
    Matcher::UserPrefix("crypto/elliptic"),
    Matcher::UserPrefix("crypto/internal/"),
    Matcher::UserPrefix("crypto/sha256"),
    Matcher::UserPrefix("vendor/golang.org/x/crypto/"),
]);

/// TLS libraries with their crypto: rustls, OpenSSL's libssl and Go's crypto/tls.
const TLS_LIBRARY: Matcher = Matcher::AnyOf(&[
    TLS_CRYPTO,
    Matcher::UserPath("rustls::"),
    Matcher::UserPrefix("SSL_"),
    Matcher::UserPrefix("ssl3_"),
    Matcher::UserPrefix("ssl_"),
    Matcher::UserPrefix("tls_"),
    Matcher::UserPrefix("tls1_"),
    Matcher::UserPrefix("tls13_"),
    Matcher::UserPrefix("ngx_ssl_"),
    Matcher::UserPrefix("[libssl"),
    Matcher::UserPrefix("crypto/tls."),
]);

/// HTTP/1.1 head parsing, HTTP/2 frame and HPACK coding and HTTP/3 frame and QPACK coding,
/// for the edge (httparse, h2, h3), nginx and HAProxy.
const HTTP_PARSING: Matcher = Matcher::AnyOf(&[
    Matcher::UserPath("httparse::"),
    Matcher::UserPath("edge::http1::head::"),
    Matcher::UserPath("h2::codec::framed_read::"),
    Matcher::UserPath("h2::frame::"),
    Matcher::UserPath("h2::hpack::"),
    Matcher::UserPath("h3::frame::"),
    Matcher::UserPath("h3::qpack::"),
    Matcher::UserPrefix("ngx_http_parse_"),
    Matcher::UserPrefix("ngx_http_v2_parse_"),
    Matcher::UserPrefix("ngx_http_huff_decode"),
    Matcher::UserPrefix("h1_parse_"),
    Matcher::UserPrefix("h1_headers_to_hdr_list"),
    Matcher::UserPrefix("h2_frt_"),
    Matcher::UserPrefix("hpack_"),
]);

/// Heap allocation and release in user space: glibc malloc, Rust's global allocator, nginx
/// pools, HAProxy pools and Go's allocator.
const ALLOCATION: Matcher = Matcher::AnyOf(&[
    Matcher::UserPrefix("malloc"),
    Matcher::UserPrefix("free"),
    Matcher::UserPrefix("calloc"),
    Matcher::UserPrefix("realloc"),
    Matcher::UserPrefix("cfree"),
    Matcher::UserPrefix("__libc_malloc"),
    Matcher::UserPrefix("__libc_free"),
    Matcher::UserPrefix("__libc_calloc"),
    Matcher::UserPrefix("__libc_realloc"),
    // glibc's internal aliases, as its symbol table names them.
    Matcher::UserPrefix("__GI___libc_malloc"),
    Matcher::UserPrefix("__GI___libc_free"),
    Matcher::UserPrefix("__GI___libc_calloc"),
    Matcher::UserPrefix("__GI___libc_realloc"),
    Matcher::UserPrefix("_int_malloc"),
    Matcher::UserPrefix("_int_free"),
    Matcher::UserPrefix("_int_realloc"),
    Matcher::UserContains("__rdl_"),
    Matcher::UserContains("__rust_alloc"),
    Matcher::UserContains("__rust_dealloc"),
    Matcher::UserContains("__rust_realloc"),
    Matcher::UserPath("<alloc::alloc::Global as core::alloc::Allocator>::"),
    Matcher::UserPrefix("ngx_palloc"),
    Matcher::UserPrefix("ngx_pnalloc"),
    Matcher::UserPrefix("ngx_pcalloc"),
    Matcher::UserPrefix("ngx_pfree"),
    Matcher::UserPrefix("ngx_alloc"),
    Matcher::UserPrefix("ngx_calloc"),
    Matcher::UserPrefix("pool_alloc"),
    Matcher::UserPrefix("__pool_alloc"),
    Matcher::UserPrefix("pool_free"),
    Matcher::UserPrefix("__pool_free"),
    Matcher::UserPrefix("runtime.mallocgc"),
]);

/// The code paths of the summary, in table order.
pub const NAMED_PATHS: &[NamedPath] = &[
    NamedPath {
        name: "socket sends, with everything under them (loopback delivery to the peer included)",
        steps: &[SOCKET_SENDS],
        user_space_only: false,
    },
    NamedPath {
        name: "io_uring sends",
        steps: &[Matcher::AnyOf(&[
            Matcher::Kernel("io_send"),
            Matcher::Kernel("io_sendmsg"),
            Matcher::Kernel("io_send_zc"),
            Matcher::Kernel("io_sendmsg_zc"),
        ])],
        user_space_only: false,
    },
    NamedPath {
        name: "softirq receive processing inside socket sends (loopback delivery to the peer)",
        steps: &[SOCKET_SENDS, SOFTIRQ_RECEIVE],
        user_space_only: false,
    },
    NamedPath {
        name: "socket receives",
        steps: &[SOCKET_RECEIVES],
        user_space_only: false,
    },
    NamedPath {
        name: "io_uring receives",
        steps: &[Matcher::AnyOf(&[
            Matcher::Kernel("io_recv"),
            Matcher::Kernel("io_recvmsg"),
        ])],
        user_space_only: false,
    },
    NamedPath {
        name: "softirq receive processing, anywhere",
        steps: &[SOFTIRQ_RECEIVE],
        user_space_only: false,
    },
    NamedPath {
        name: "waking a socket's reader",
        steps: &[Matcher::Kernel("sock_def_readable")],
        user_space_only: false,
    },
    NamedPath {
        name: "system calls, from entry to return",
        steps: &[Matcher::AnyOf(&[
            Matcher::Kernel("entry_SYSCALL_64_after_hwframe"),
            Matcher::Kernel("entry_SYSCALL_64"),
            Matcher::Kernel("el0_svc"),
        ])],
        user_space_only: false,
    },
    NamedPath {
        name: "TLS crypto",
        steps: &[TLS_CRYPTO],
        user_space_only: true,
    },
    NamedPath {
        name: "TLS library, crypto included",
        steps: &[TLS_LIBRARY],
        user_space_only: true,
    },
    NamedPath {
        name: "HTTP parsing and header coding",
        steps: &[HTTP_PARSING],
        user_space_only: true,
    },
    NamedPath {
        name: "heap allocation (user space)",
        steps: &[ALLOCATION],
        user_space_only: false,
    },
];

/// Description of the profiled proxy, the load and the recording, for the summary's header.
#[derive(Debug, Clone)]
pub struct ProfileInfo {
    /// Proxy name and version, for example `edge 0.1.0 (commit 32ce7d2)`.
    pub proxy: String,
    /// Scenario label, for example `HTTPS keep-alive`.
    pub scenario: String,
    /// Protocol, pacing and connections of the load.
    pub load: String,
    pub requests_per_s: f64,
    /// Time over which the load generator measured `requests_per_s`: from the end of the
    /// warm-up to the end of the load, which runs longer than perf records.
    pub load_measured_s: f64,
    pub load_errors: u64,
    pub started_utc: String,
    pub command: String,
    /// CPU model, CPU count and kernel.
    pub host: String,
    pub pinning: String,
    /// The `perf record` command line, with the pids.
    pub perf_record: String,
    pub perf_version: String,
    pub warmup_s: f64,
    /// Length of the recording window, the `sleep` that perf runs.
    pub window_s: f64,
    /// Time from the start of perf to its exit: the window plus attaching to the processes
    /// and finishing the file.
    pub perf_run_s: f64,
    pub frequency_hz: u32,
    /// CPU time of the proxy's processes from the start of perf to its exit, from `/proc`.
    pub proxy_cpu_s: f64,
    pub flame_graph_file: String,
    pub folded_file: String,
}

/// Renders the summary of `stacks`.
pub fn render_markdown(info: &ProfileInfo, stacks: &FoldedStacks) -> String {
    let total = stacks.total_samples();
    let share = |samples: u64| percent(samples, total);
    let mut md = String::new();
    let _ = writeln!(md, "# CPU profile of {}, {}\n", info.proxy, info.scenario);
    let _ = writeln!(
        md,
        "Recorded {} with `{}`.\n",
        info.started_utc, info.command
    );
    let _ = writeln!(md, "| | |\n| --- | --- |");
    let _ = writeln!(
        md,
        "| load | {}; {} requests/s over the {:.1} s after the warm-up, {} errors |",
        info.load,
        thousands(info.requests_per_s),
        info.load_measured_s,
        info.load_errors
    );
    let _ = writeln!(
        md,
        "| sampling | `{}` ({}), started after {:.1} s of warm-up |",
        info.perf_record, info.perf_version, info.warmup_s
    );
    let _ = writeln!(
        md,
        "| samples | {} in the {:.1} s window; perf ran {:.1} s with attaching and finishing, \
         while the proxy used {:.2} s of CPU time (`/proc`) |",
        thousands(total as f64),
        info.window_s,
        info.perf_run_s,
        info.proxy_cpu_s
    );
    let _ = writeln!(md, "| host | {} |", info.host);
    let _ = writeln!(md, "| pinning | {} |\n", info.pinning);
    let _ = writeln!(
        md,
        "Flame graph: [{svg}]({svg}). Collapsed stacks: [{folded}]({folded}).\n",
        svg = info.flame_graph_file,
        folded = info.folded_file
    );

    let self_counts = self_samples(stacks);
    let kernel: u64 = self_counts
        .iter()
        .filter(|(frame, _)| split_annotation(frame).1 == Space::Kernel)
        .map(|(_, n)| n)
        .sum();
    let _ = writeln!(md, "## Kernel and user space\n");
    let _ = writeln!(
        md,
        "By the function each sample was taken in.\n\n| space | samples | share |\n| --- | ---: | ---: |"
    );
    let _ = writeln!(
        md,
        "| kernel | {} | {} |",
        thousands(kernel as f64),
        share(kernel)
    );
    let user = total - kernel;
    let _ = writeln!(
        md,
        "| user space | {} | {} |\n",
        thousands(user as f64),
        share(user)
    );

    let _ = writeln!(md, "## Named paths\n");
    let _ = writeln!(
        md,
        "Samples whose stack contains a matching frame, with everything called from it. A \
         sample can count in several rows. The frames each row matches are listed below the \
         table.\n\n| path | samples | share |\n| --- | ---: | ---: |"
    );
    for path in NAMED_PATHS {
        let samples = path_samples(stacks, path);
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            path.name,
            thousands(samples as f64),
            share(samples)
        );
    }
    md.push('\n');
    for path in NAMED_PATHS {
        let steps: Vec<String> = path.steps.iter().map(Matcher::describe).collect();
        let space = if path.user_space_only {
            "samples taken in user space under "
        } else {
            ""
        };
        let _ = writeln!(
            md,
            "- {}: {space}{}",
            path.name,
            steps.join(", then under it, ")
        );
    }
    md.push_str("\n[k] marks a kernel function. The others are user-space names.\n\n");

    let _ = writeln!(md, "## Top {TOP_FUNCTIONS} functions by self samples\n");
    top_table(&mut md, &self_counts, total, |_| true);
    let _ = writeln!(
        md,
        "\n## Top {TOP_FUNCTIONS} user-space functions by self samples\n"
    );
    top_table(&mut md, &self_counts, total, |frame| {
        split_annotation(frame).1 == Space::User
    });

    let _ = writeln!(
        md,
        "\n## Threads\n\n| thread | samples | share |\n| --- | ---: | ---: |"
    );
    for (thread, samples) in thread_samples(stacks) {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            table_code(&thread),
            thousands(samples as f64),
            share(samples)
        );
    }
    let truncated = truncated_samples(stacks);
    if truncated > 0 {
        let _ = writeln!(
            md,
            "\n{} of the samples ({}) have a user stack that perf could not unwind up to the \
             thread's start, usually because it is deeper than the copied stack. Their \
             outermost frame is `[unknown]`, right above the thread name in the flame graph.",
            share(truncated),
            thousands(truncated as f64)
        );
    }
    md
}

/// Returns the self samples of each frame (the function a sample was taken in), most first.
pub fn self_samples(stacks: &FoldedStacks) -> Vec<(String, u64)> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for stack in &stacks.stacks {
        if let Some(leaf) = stack.frames.get(1..).and_then(<[String]>::last) {
            *counts.entry(leaf.as_str()).or_insert(0) += stack.samples;
        }
    }
    sorted_counts(counts)
}

/// Returns the samples whose stack matches `path`.
pub fn path_samples(stacks: &FoldedStacks, path: &NamedPath) -> u64 {
    stacks
        .stacks
        .iter()
        .filter(|stack| path.matches(stack.frames.get(1..).unwrap_or_default()))
        .map(|stack| stack.samples)
        .sum()
}

/// Returns the samples of each thread name, most first.
fn thread_samples(stacks: &FoldedStacks) -> Vec<(String, u64)> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for stack in &stacks.stacks {
        if let Some(thread) = stack.frames.first() {
            *counts.entry(thread.as_str()).or_insert(0) += stack.samples;
        }
    }
    sorted_counts(counts)
}

/// Returns the samples whose outermost frame below the thread name is `[unknown]`.
fn truncated_samples(stacks: &FoldedStacks) -> u64 {
    stacks
        .stacks
        .iter()
        .filter(|stack| stack.frames.get(1).is_some_and(|f| f == "[unknown]"))
        .map(|stack| stack.samples)
        .sum()
}

fn sorted_counts(counts: HashMap<&str, u64>) -> Vec<(String, u64)> {
    let mut sorted: Vec<(String, u64)> = counts
        .into_iter()
        .map(|(name, n)| (name.to_owned(), n))
        .collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    sorted
}

fn top_table(md: &mut String, counts: &[(String, u64)], total: u64, keep: impl Fn(&str) -> bool) {
    let _ = writeln!(
        md,
        "| # | function | space | samples | share |\n| ---: | --- | --- | ---: | ---: |"
    );
    for (rank, (frame, samples)) in counts
        .iter()
        .filter(|(frame, _)| keep(frame))
        .take(TOP_FUNCTIONS)
        .enumerate()
    {
        let (name, space, inlined) = split_annotation(frame);
        let space = match (space, inlined) {
            (Space::Kernel, _) => "kernel",
            (Space::User, true) => "user, inlined",
            (Space::User, false) => "user",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {space} | {} | {} |",
            rank + 1,
            table_code(name),
            thousands(*samples as f64),
            percent(*samples, total)
        );
    }
}

/// Formats a name as inline code that is safe inside a Markdown table cell.
fn table_code(name: &str) -> String {
    format!("`{}`", name.replace('|', "\\|").replace('`', "'"))
}

fn percent(part: u64, total: u64) -> String {
    if total == 0 {
        return "–".to_owned();
    }
    format!("{:.1} %", part as f64 * 100.0 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stacks(pairs: &[(&str, u64)]) -> FoldedStacks {
        FoldedStacks::from_pairs(pairs)
    }

    fn sample_stacks() -> FoldedStacks {
        stacks(&[
            (
                "edge-worker-0;edge::worker::run;io_send_[k];sock_sendmsg_[k];tcp_sendmsg_[k];__local_bh_enable_ip_[k];net_rx_action_[k];tcp_v4_rcv_[k];sock_def_readable_[k]",
                6,
            ),
            (
                "edge-worker-0;edge::worker::run;io_recv_[k];sock_recvmsg_[k]",
                3,
            ),
            (
                "edge-worker-0;edge::worker::run;edge::http1::head::parse_request;httparse::parse_headers_[i]",
                2,
            ),
            ("edge-worker-0;[unknown];__rustc::__rdl_alloc;malloc", 1),
            (
                "edge-worker-0;irq_exit_rcu_[k];net_rx_action_[k];process_backlog_[k]",
                1,
            ),
        ])
    }

    fn samples_of(name: &str) -> u64 {
        let path = NAMED_PATHS.iter().find(|p| p.name == name).unwrap();
        path_samples(&sample_stacks(), path)
    }

    #[test]
    fn sends_include_peer_delivery() {
        assert_eq!(
            samples_of(
                "socket sends, with everything under them (loopback delivery to the peer included)"
            ),
            6
        );
        assert_eq!(samples_of("io_uring sends"), 6);
    }

    #[test]
    fn softirq_inside_sends_needs_order() {
        assert_eq!(
            samples_of(
                "softirq receive processing inside socket sends (loopback delivery to the peer)"
            ),
            6
        );
        assert_eq!(samples_of("softirq receive processing, anywhere"), 7);
        let reversed = stacks(&[("t;net_rx_action_[k];tcp_sendmsg_[k]", 4)]);
        let path = NamedPath {
            name: "test",
            steps: &[SOCKET_SENDS, SOFTIRQ_RECEIVE],
            user_space_only: false,
        };
        assert_eq!(path_samples(&reversed, &path), 0);
    }

    #[test]
    fn user_matchers_skip_kernel_frames() {
        assert_eq!(samples_of("HTTP parsing and header coding"), 2);
        assert_eq!(samples_of("heap allocation (user space)"), 1);
        let kernel_tls = stacks(&[("t;tls_sw_sendmsg_[k]", 5)]);
        let path = NamedPath {
            name: "test",
            steps: &[TLS_LIBRARY],
            user_space_only: false,
        };
        assert_eq!(path_samples(&kernel_tls, &path), 0);
    }

    #[test]
    fn tls_write_system_call_is_not_crypto() {
        let nginx = stacks(&[
            (
                "nginx;SSL_write;BIO_write;[libcrypto.so.3];__GI___libc_write;tcp_sendmsg_[k]",
                5,
            ),
            ("nginx;SSL_write;[libssl.so.3];[libcrypto.so.3]", 2),
        ]);
        for name in ["TLS crypto", "TLS library, crypto included"] {
            let path = NAMED_PATHS.iter().find(|p| p.name == name).unwrap();
            assert_eq!(path_samples(&nginx, path), 2, "{name}");
        }
    }

    #[test]
    fn allocation_counts_glibc_internal_names() {
        let nginx = stacks(&[
            ("nginx;ngx_ssl_write;__GI___libc_malloc", 3),
            ("nginx;ngx_ssl_write;__GI___libc_free", 2),
            ("nginx;ngx_ssl_write;[libcrypto.so.3]", 4),
        ]);
        let path = NAMED_PATHS
            .iter()
            .find(|p| p.name == "heap allocation (user space)")
            .unwrap();
        assert_eq!(path_samples(&nginx, path), 5);
    }

    #[test]
    fn thread_name_never_matches_a_path() {
        let only_thread = stacks(&[("malloc", 3)]);
        let path = NamedPath {
            name: "test",
            steps: &[ALLOCATION],
            user_space_only: false,
        };
        assert_eq!(path_samples(&only_thread, &path), 0);
    }

    #[test]
    fn self_samples_count_leaf_frames() {
        let counts = self_samples(&sample_stacks());
        assert_eq!(counts[0], ("sock_def_readable_[k]".to_owned(), 6));
        assert_eq!(counts[1], ("sock_recvmsg_[k]".to_owned(), 3));
        assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 13);
    }

    #[test]
    fn markdown_reports_spaces_and_truncation() {
        let info = ProfileInfo {
            proxy: "edge 0.1.0".to_owned(),
            scenario: "HTTP/1.1 keep-alive".to_owned(),
            load: "HTTP/1.1, closed loop, 32 connections".to_owned(),
            requests_per_s: 50_000.0,
            load_measured_s: 9.0,
            load_errors: 0,
            started_utc: "2026-12-05T07:00:00Z".to_owned(),
            command: "cargo xtask profile".to_owned(),
            host: "test CPU".to_owned(),
            pinning: "none".to_owned(),
            perf_record: "perf record".to_owned(),
            perf_version: "perf version 6.1".to_owned(),
            warmup_s: 2.0,
            window_s: 6.0,
            perf_run_s: 7.2,
            frequency_hz: 999,
            proxy_cpu_s: 6.9,
            flame_graph_file: "p.svg".to_owned(),
            folded_file: "p.folded".to_owned(),
        };
        let md = render_markdown(&info, &sample_stacks());
        assert!(md.contains("| kernel | 10 | 76.9 % |"), "{md}");
        assert!(md.contains("| user space | 3 | 23.1 % |"), "{md}");
        assert!(
            md.contains("| 1 | `sock_def_readable` | kernel | 6 | 46.2 % |"),
            "{md}"
        );
        assert!(
            md.contains("| `httparse::parse_headers` | user, inlined | 2 |"),
            "{md}"
        );
        assert!(
            md.contains("7.7 % of the samples (1) have a user stack"),
            "{md}"
        );
        assert!(
            md.contains("| samples | 13 in the 6.0 s window; perf ran 7.2 s"),
            "{md}"
        );
    }

    #[test]
    fn rust_path_must_start_a_path() {
        assert!(names_path("ring::aead::seal", "ring::"));
        assert!(names_path("<ring::aead::X as core::Y>::f", "ring::"));
        assert!(names_path(
            "core::ptr::drop_in_place<ring::aead::X>",
            "ring::"
        ));
        assert!(!names_path(
            "monoio::driver::uring::IoUringDriver::park",
            "ring::"
        ));
        assert!(!names_path("edge::string::f", "ring::"));
        assert!(!names_path("http2::frame::f", "h2::frame::"));
    }

    #[test]
    fn io_uring_frames_are_not_crypto() {
        let uring = stacks(&[("t;monoio::driver::uring::IoUringDriver::inner_park", 5)]);
        let crypto = NAMED_PATHS.iter().find(|p| p.name == "TLS crypto").unwrap();
        assert_eq!(path_samples(&uring, crypto), 0);
        let ring = stacks(&[("t;ring_core_0_17_14__aes_hw_ctr32_encrypt_blocks", 2)]);
        assert_eq!(path_samples(&ring, crypto), 2);
    }

    #[test]
    fn table_code_escapes_pipes() {
        assert_eq!(table_code("a|b`c"), "`a\\|b'c`");
    }
}
