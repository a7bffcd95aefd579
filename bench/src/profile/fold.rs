//! Folding of `perf script` output into collapsed stacks: one line per distinct stack,
//! `thread;root;…;leaf count`, the format of stackcollapse-perf.pl from the FlameGraph
//! repository and of inferno.
//!
//! Frame names lose their offsets (`+0x1f`) and Rust symbol hashes, so that samples at
//! different addresses of one function merge. Kernel frames end in `_[k]` and inlined frames
//! in `_[i]`, the annotations of stackcollapse-perf.pl `--all`. A frame without a symbol is
//! named after its object file in brackets (`[libc.so.6]`), or `[unknown]`. A `;` inside a
//! name, as in the Rust array type `[u8; 4]`, becomes `,`, because `;` separates frames.

use std::collections::HashMap;

/// Suffix of a kernel frame's name.
pub const KERNEL_SUFFIX: &str = "_[k]";

/// Suffix of the name of a function that the compiler inlined into its caller.
pub const INLINED_SUFFIX: &str = "_[i]";

/// Lowest kernel address on x86-64 and arm64 with 48-bit virtual addresses.
const KERNEL_ADDRESS_START: u64 = 0xffff_8000_0000_0000;

/// Samples that share one call stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    /// The thread name, then the frames from the outermost caller to the sampled function.
    pub frames: Vec<String>,
    pub samples: u64,
}

/// Collapsed stacks, sorted by their frames.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FoldedStacks {
    pub stacks: Vec<Stack>,
}

impl FoldedStacks {
    /// Returns the number of samples in all stacks.
    pub fn total_samples(&self) -> u64 {
        self.stacks.iter().map(|s| s.samples).sum()
    }

    /// Renders the stacks in the collapsed format, one `a;b;c count` line each.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for stack in &self.stacks {
            text.push_str(&stack.frames.join(";"));
            text.push(' ');
            text.push_str(&stack.samples.to_string());
            text.push('\n');
        }
        text
    }

    /// Builds stacks from `("a;b;c", samples)` pairs, for tests.
    #[cfg(test)]
    pub fn from_pairs(pairs: &[(&str, u64)]) -> Self {
        Self {
            stacks: pairs
                .iter()
                .map(|(frames, samples)| Stack {
                    frames: frames.split(';').map(str::to_owned).collect(),
                    samples: *samples,
                })
                .collect(),
        }
    }
}

/// Whether a frame of a collapsed stack runs in the kernel or in user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Kernel,
    User,
}

/// Splits a frame of a collapsed stack into its name without annotation, its space, and
/// whether it was inlined.
pub fn split_annotation(frame: &str) -> (&str, Space, bool) {
    if let Some(name) = frame.strip_suffix(KERNEL_SUFFIX) {
        (name, Space::Kernel, false)
    } else if let Some(name) = frame.strip_suffix(INLINED_SUFFIX) {
        (name, Space::User, true)
    } else {
        (frame, Space::User, false)
    }
}

/// Folds `perf script` output line by line.
///
/// It reads the output of `perf script -F comm,pid,tid,event,ip,sym,dso` with call chains: a
/// header line per sample, one indented line per frame with the sampled function first, and
/// a blank line after each sample. Other header fields are tolerated.
#[derive(Debug, Default)]
pub struct Folder {
    counts: HashMap<String, u64>,
    /// Thread name and frames, sampled function first, of the sample being read.
    current: Option<(String, Vec<String>)>,
}

impl Folder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one line of `perf script` output, without its line break.
    pub fn push_line(&mut self, line: &str) {
        let line = line.trim_end();
        if line.is_empty() {
            self.finish_sample();
        } else if line.starts_with(char::is_whitespace) {
            if let Some((_, frames)) = &mut self.current {
                frames.push(parse_frame(line.trim_start()));
            }
        } else if !line.starts_with('#') {
            // A header without a blank line before it starts the next sample all the same.
            self.finish_sample();
            self.current = Some((thread_name(line), Vec::new()));
        }
    }

    /// Ends the input and returns the collapsed stacks.
    pub fn finish(mut self) -> FoldedStacks {
        self.finish_sample();
        let mut stacks: Vec<Stack> = self
            .counts
            .into_iter()
            .map(|(key, samples)| Stack {
                frames: key.split(';').map(str::to_owned).collect(),
                samples,
            })
            .collect();
        stacks.sort_by(|a, b| a.frames.cmp(&b.frames));
        FoldedStacks { stacks }
    }

    fn finish_sample(&mut self) {
        let Some((thread, frames)) = self.current.take() else {
            return;
        };
        let mut key = thread;
        for frame in frames.iter().rev() {
            key.push(';');
            key.push_str(frame);
        }
        *self.counts.entry(key).or_insert(0) += 1;
    }
}

/// Extracts the thread name (perf's `comm`) from a sample header such as
/// `edge-worker-0 14467/14470 cpu-clock:`. The name may contain spaces, so it ends before the
/// first field that is a pid, `pid/tid` or a CPU number in brackets.
fn thread_name(header: &str) -> String {
    let fields: Vec<&str> = header.split_whitespace().collect();
    let end = fields
        .iter()
        .skip(1)
        .position(|field| is_pid_field(field) || field.starts_with('['))
        .map_or(1, |index| index + 1);
    sanitize(&fields[..end].join(" "))
}

fn is_pid_field(field: &str) -> bool {
    field
        .split('/')
        .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

/// Turns one frame line of a call chain, such as
/// `ffffffff81e7438b sock_recvmsg+0xab ([kernel.kallsyms])` or
/// `6d4d7e io_uring::submit::Submitter::enter+0x34e (inlined)`, into an annotated name.
fn parse_frame(line: &str) -> String {
    let (address, rest) = match line.split_once(' ') {
        Some((first, rest)) => match u64::from_str_radix(first, 16) {
            Ok(address) => (Some(address), rest.trim()),
            Err(_) => (None, line),
        },
        None => (None, line),
    };
    let (symbol, object, inlined) = split_object(rest);
    let symbol = strip_rust_hash(strip_offset(symbol.trim()));
    let name = if symbol.is_empty() || symbol == "[unknown]" {
        match object {
            Some(object) if object != "[unknown]" => object_name(object),
            _ => "[unknown]".to_owned(),
        }
    } else {
        sanitize(symbol)
    };
    let in_kernel = object.is_some_and(|o| o.starts_with("[kernel"))
        || address.is_some_and(|a| a >= KERNEL_ADDRESS_START && a != u64::MAX);
    if in_kernel {
        name + KERNEL_SUFFIX
    } else if inlined {
        name + INLINED_SUFFIX
    } else {
        name
    }
}

/// Splits `symbol (object)` or `symbol (inlined)` into the symbol, the object file and whether
/// the frame is inlined. perf writes ` (deleted)` inside the brackets for a replaced file.
fn split_object(text: &str) -> (&str, Option<&str>, bool) {
    if let Some(symbol) = text.strip_suffix(" (inlined)") {
        return (symbol, None, true);
    }
    let Some(body) = text
        .strip_suffix(" (deleted))")
        .or_else(|| text.strip_suffix(')'))
    else {
        return (text, None, false);
    };
    match body.rfind(" (") {
        Some(open) => (&body[..open], Some(&body[open + 2..]), false),
        None => match body.strip_prefix('(') {
            Some(object) => ("", Some(object), false),
            None => (text, None, false),
        },
    }
}

/// Returns `[file name]` for an object path, or the bracketed name perf gives kernel modules
/// and special mappings (`[vdso]`) unchanged.
fn object_name(object: &str) -> String {
    if object.starts_with('[') {
        return sanitize(object);
    }
    let file = object.rsplit('/').next().unwrap_or(object);
    format!("[{}]", sanitize(file))
}

/// Removes a `+0x1f` offset from the end of a symbol.
fn strip_offset(symbol: &str) -> &str {
    match symbol.rfind("+0x") {
        Some(plus) if is_hex(&symbol[plus + 3..]) => &symbol[..plus],
        _ => symbol,
    }
}

/// Removes the `::h0123456789abcdef` hash that legacy Rust symbol mangling appends.
fn strip_rust_hash(symbol: &str) -> &str {
    match symbol.len().checked_sub(19) {
        Some(start)
            if symbol.is_char_boundary(start)
                && symbol[start..].starts_with("::h")
                && is_hex(&symbol[start + 3..]) =>
        {
            &symbol[..start]
        }
        _ => symbol,
    }
}

fn is_hex(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn sanitize(name: &str) -> String {
    name.replace(';', ",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two samples with the same stack at different offsets, one with an inlined frame, a
    /// sample whose user stack perf could not unwind, a frame without a symbol in a shared
    /// library, and a thread name with a space.
    const SCRIPT: &str = "\
edge-worker-0 14467/14470 cpu-clock: 
\tffffffff81e7438b sock_recvmsg+0xab ([kernel.kallsyms])
\tffffffff81b9ae14 io_recv+0x174 ([kernel.kallsyms])
\t          101829 syscall+0x19 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t          6d4d7e io_uring::submit::Submitter::enter+0x34e (inlined)
\t          6d4d7e monoio::driver::uring::IoUringDriver::inner_park+0x34e (/work/target/release/edge)
\t          2f8284 edge::worker::run+0x25c4 (/work/target/release/edge)

edge-worker-0 14467/14470 cpu-clock: 
\tffffffff81e74400 sock_recvmsg+0x120 ([kernel.kallsyms])
\tffffffff81b9ae20 io_recv+0x180 ([kernel.kallsyms])
\t          101829 syscall+0x19 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t          6d4d7e io_uring::submit::Submitter::enter+0x34e (inlined)
\t          6d4d7e monoio::driver::uring::IoUringDriver::inner_park+0x34e (/work/target/release/edge)
\t          2f8284 edge::worker::run+0x25c4 (/work/target/release/edge)

edge-worker-0 14467/14470 cpu-clock: 
\t          39b747 edge::http1::conn::handle_request::{{closure}}+0x3347 (/work/target/release/edge)
\tffffffffffffffff [unknown] ([unknown])

nginx: worker 2001/2001 cpu-clock: 
\t            7f12 [unknown] (/usr/lib/x86_64-linux-gnu/libcrypto.so.3)
\t          4a1b2c <[u8; 4] as core::fmt::Debug>::fmt::h0123456789abcdef+0x10 (/usr/sbin/nginx (deleted))
";

    fn fold(text: &str) -> FoldedStacks {
        let mut folder = Folder::new();
        for line in text.lines() {
            folder.push_line(line);
        }
        folder.finish()
    }

    #[test]
    fn identical_stacks_merge_without_offsets() {
        let folded = fold(SCRIPT);
        assert_eq!(folded.total_samples(), 4);
        assert_eq!(folded.stacks.len(), 3);
        let recv = folded
            .stacks
            .iter()
            .find(|s| s.frames.last().is_some_and(|f| f == "sock_recvmsg_[k]"))
            .unwrap();
        assert_eq!(recv.samples, 2);
    }

    #[test]
    fn frames_run_from_thread_to_leaf() {
        let folded = fold(SCRIPT);
        let recv = folded.stacks.iter().find(|s| s.samples == 2).unwrap();
        assert_eq!(
            recv.frames,
            vec![
                "edge-worker-0",
                "edge::worker::run",
                "monoio::driver::uring::IoUringDriver::inner_park",
                "io_uring::submit::Submitter::enter_[i]",
                "syscall",
                "io_recv_[k]",
                "sock_recvmsg_[k]",
            ]
        );
    }

    #[test]
    fn unknown_frames_are_named_by_object() {
        let folded = fold(SCRIPT);
        let nginx = folded
            .stacks
            .iter()
            .find(|s| s.frames[0] == "nginx: worker")
            .unwrap();
        assert_eq!(
            nginx.frames,
            vec![
                "nginx: worker",
                "<[u8, 4] as core::fmt::Debug>::fmt",
                "[libcrypto.so.3]",
            ]
        );
    }

    #[test]
    fn unwinding_end_marker_is_user_unknown() {
        let folded = fold(SCRIPT);
        let truncated = folded
            .stacks
            .iter()
            .find(|s| s.frames.len() == 3 && s.frames[0] == "edge-worker-0")
            .unwrap();
        assert_eq!(truncated.frames[1], "[unknown]");
        assert_eq!(
            truncated.frames[2],
            "edge::http1::conn::handle_request::{{closure}}"
        );
    }

    #[test]
    fn folded_text_has_one_line_per_stack() {
        let text = fold(SCRIPT).to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines
            .contains(&"edge-worker-0;[unknown];edge::http1::conn::handle_request::{{closure}} 1"));
        assert!(lines.iter().all(|l| l
            .rsplit_once(' ')
            .is_some_and(|(_, n)| n.parse::<u64>().is_ok())));
    }

    #[test]
    fn sample_without_blank_line_still_counts() {
        let text = "a 1/1 cpu-clock:\n\tffffffff81000000 f ([kernel.kallsyms])\nb 2/2 cpu-clock:\n\t10 g (/bin/b)\n";
        let folded = fold(text);
        assert_eq!(folded.total_samples(), 2);
        assert_eq!(folded.stacks[0].frames, vec!["a", "f_[k]"]);
        assert_eq!(folded.stacks[1].frames, vec!["b", "g"]);
    }

    #[test]
    fn sample_without_call_chain_keeps_thread() {
        let folded = fold("idle 5/5 cpu-clock:\n\n");
        assert_eq!(folded.stacks[0].frames, vec!["idle"]);
    }

    #[test]
    fn kernel_module_and_bpf_frames_are_kernel() {
        assert_eq!(
            parse_frame("ffffffffc0a1b2c3 nft_do_chain+0x9 ([nf_tables])"),
            "nft_do_chain_[k]"
        );
        assert_eq!(
            parse_frame("ffffffffc0012345 bpf_prog_6deef7357e7b4530_edge_xdp+0x40 ([unknown])"),
            "bpf_prog_6deef7357e7b4530_edge_xdp_[k]"
        );
        assert_eq!(
            parse_frame("ffffffff81234567 [unknown] ([kernel.kallsyms])"),
            "[kernel.kallsyms]_[k]"
        );
    }

    #[test]
    fn vdso_frame_is_user_space() {
        assert_eq!(
            parse_frame("7ffd1234 __vdso_clock_gettime+0x5 ([vdso])"),
            "__vdso_clock_gettime"
        );
        assert_eq!(parse_frame("7ffd1234 [unknown] ([vdso])"), "[vdso]");
    }

    #[test]
    fn offsets_and_hashes_need_hex_digits() {
        assert_eq!(strip_offset("f+0x1f"), "f");
        assert_eq!(strip_offset("a+0xzz"), "a+0xzz");
        assert_eq!(
            strip_rust_hash("std::rt::lang_start::h0123456789abcdef"),
            "std::rt::lang_start"
        );
        assert_eq!(strip_rust_hash("edge::hash"), "edge::hash");
    }

    #[test]
    fn annotation_gives_space_and_inlining() {
        assert_eq!(
            split_annotation("tcp_sendmsg_[k]"),
            ("tcp_sendmsg", Space::Kernel, false)
        );
        assert_eq!(
            split_annotation("core::ptr::copy_[i]"),
            ("core::ptr::copy", Space::User, true)
        );
        assert_eq!(split_annotation("malloc"), ("malloc", Space::User, false));
    }
}
