/* Map keys, values, names and limits shared by the kernel programs and userspace.
 *
 * The Rust mirror of every type here is in edge-ebpf/src/lib.rs. Both sides assert the sizes,
 * so a change on one side that is not made on the other fails to build.
 */
#ifndef EDGE_EBPF_H
#define EDGE_EBPF_H

#include <linux/types.h>

/* Maximum entries of each map. Keep in sync with the constants in lib.rs. */
#define EDGE_BLOCK_MAX 65536
#define EDGE_BUCKETS_MAX 65536
#define EDGE_PORTS_MAX 64
#define EDGE_WORKERS_MAX 256
#define EDGE_CPUS_MAX 1024
#define EDGE_STATS_MAX 16

/* Length of the QUIC connection IDs the edge issues. The first byte is the worker id. */
#define EDGE_QUIC_CID_LEN 8

/* Key of the IPv4 block list (LPM trie). `addr` is in network byte order. */
struct edge_lpm_v4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

/* Key of the IPv6 block list (LPM trie). `addr` is in network byte order. */
struct edge_lpm_v6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Block was added by an operator (`edgectl block`). */
#define EDGE_BLOCK_MANUAL 0
/* Block was added automatically after protocol abuse. */
#define EDGE_BLOCK_AUTO 1

/* Value of both block lists. */
struct edge_block {
	/* CLOCK_MONOTONIC time in ns after which the entry no longer applies; 0 = never. */
	__u64 expires_ns;
	/* EDGE_BLOCK_MANUAL or EDGE_BLOCK_AUTO. */
	__u32 origin;
	__u32 pad;
};

/* Rate limits, one entry at index 0, written by the agent. A rate of 0 disables that limit. */
struct edge_limits {
	/* New TCP connections (SYN without ACK) per second and per source. */
	__u32 syn_rate;
	/* Bucket size: SYNs a source may send at once before the rate applies. */
	__u32 syn_burst;
	/* QUIC Initial packets per second and per source. */
	__u32 quic_rate;
	__u32 quic_burst;
	/* A source is the IPv4 or IPv6 prefix of this length around the sender's address, so a
	 * host that owns a whole IPv6 /64 gets one bucket, not 2^64 of them. 0 makes all
	 * senders of that family share one bucket. */
	__u32 v4_prefix_len;
	__u32 v6_prefix_len;
	/* Automatic blocking after malformed packets to our ports: each one takes a token from the
	 * sending address's abuse bucket (this rate and burst), and an empty bucket blocks the
	 * address for `abuse_block_secs`. A rate of 0 turns automatic blocking off. */
	__u32 abuse_rate;
	__u32 abuse_burst;
	__u32 abuse_block_secs;
};

/* Bucket kinds in `edge_bucket_key.kind`. */
#define EDGE_BUCKET_SYN 0
#define EDGE_BUCKET_QUIC 1
#define EDGE_BUCKET_ABUSE 2

/* Key of the token buckets: the source prefix (host bits cleared), IPv4 as ::ffff:a.b.c.d. */
struct edge_bucket_key {
	__u8 addr[16];
	__u32 kind;
};

/* A token bucket; tokens are counted in thousandths. */
struct edge_bucket {
	__u64 tokens_milli;
	/* CLOCK_MONOTONIC time in ns of the last refill. */
	__u64 last_ns;
};

/* Key of the ports the edge serves: the filter only rate-limits and checks these. */
struct edge_port_key {
	/* Network byte order. */
	__u16 port;
	/* IPPROTO_TCP or IPPROTO_UDP. */
	__u8 proto;
	__u8 pad;
};

/* Steering modes of `edge_steer_config.mode`. */
#define EDGE_STEER_HASH 0
#define EDGE_STEER_CPU 1

/* Steering settings, one entry at index 0, written by the edge. */
struct edge_steer_config {
	/* EDGE_STEER_HASH: spread by the flow hash. EDGE_STEER_CPU: the worker of the CPU that
	 * received the packet, when it has one, else by the flow hash. */
	__u32 mode;
	/* Number of worker sockets in each socket array (TCP and UDP alike). */
	__u32 workers;
};

/* Indexes of `edge_stats`, one counter per decision. */
#define EDGE_STAT_PASS_NOT_IP 0
#define EDGE_STAT_PASS_ICMP 1
#define EDGE_STAT_PASS_OTHER 2
#define EDGE_STAT_PASS_UNPARSED 3
#define EDGE_STAT_PASS_ALLOWED 4
#define EDGE_STAT_DROP_BLOCKED 5
#define EDGE_STAT_DROP_SYN_RATE 6
#define EDGE_STAT_DROP_QUIC_RATE 7
#define EDGE_STAT_DROP_MALFORMED 8
#define EDGE_STAT_STEER_CPU 9
#define EDGE_STAT_STEER_HASH 10
#define EDGE_STAT_STEER_DEFAULT 11
#define EDGE_STAT_AUTO_BLOCKED 12
/* QUIC datagrams steered to the worker named by their destination connection ID. */
#define EDGE_STAT_STEER_QUIC_CID 13
/* QUIC datagrams without one of our connection IDs (client Initials), steered by the hash. */
#define EDGE_STAT_STEER_QUIC_HASH 14
/* QUIC datagrams left to the kernel's own choice. */
#define EDGE_STAT_STEER_QUIC_DEFAULT 15

#endif
