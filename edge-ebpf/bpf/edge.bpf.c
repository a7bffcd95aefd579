/* The edge's kernel programs: the XDP abuse filter and the SO_REUSEPORT socket selectors.
 *
 * XDP (`edge_xdp`), in order:
 *   1. frames that are not IPv4 or IPv6 (ARP, LLDP, ...) pass;
 *   2. sources in the block lists (LPM tries) are dropped;
 *   3. ICMP and ICMPv6 pass (path MTU discovery needs them);
 *   4. TCP and UDP to ports outside `edge_ports` pass untouched;
 *   5. to our ports: malformed headers are dropped, SYN without ACK and QUIC Initial packets
 *      take a token from the source's bucket or are dropped, everything else passes.
 * Every decision adds one to its counter in `edge_stats` (per CPU).
 *
 * SO_REUSEPORT (`edge_steer_http`, `edge_steer_https`): pick the worker socket for a new
 * connection, by the receiving CPU or by the flow hash.
 *
 * SO_REUSEPORT for QUIC (`edge_steer_quic`): pick the worker socket for every UDP datagram,
 * by the worker id in the QUIC destination connection ID, else by the flow hash.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "edge.h"

_Static_assert(sizeof(struct edge_lpm_v4_key) == 8, "edge_lpm_v4_key size");
_Static_assert(sizeof(struct edge_lpm_v6_key) == 20, "edge_lpm_v6_key size");
_Static_assert(sizeof(struct edge_block) == 16, "edge_block size");
_Static_assert(sizeof(struct edge_limits) == 36, "edge_limits size");
_Static_assert(sizeof(struct edge_bucket_key) == 20, "edge_bucket_key size");
_Static_assert(sizeof(struct edge_bucket) == 16, "edge_bucket size");
_Static_assert(sizeof(struct edge_port_key) == 4, "edge_port_key size");
_Static_assert(sizeof(struct edge_steer_config) == 8, "edge_steer_config size");

/* Pinned under /sys/fs/bpf/edge/ so the agent can change them while the program runs. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct edge_lpm_v4_key);
	__type(value, struct edge_block);
	__uint(max_entries, EDGE_BLOCK_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} edge_block_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct edge_lpm_v6_key);
	__type(value, struct edge_block);
	__uint(max_entries, EDGE_BLOCK_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} edge_block_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct edge_limits);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} edge_limits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, EDGE_STATS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} edge_stats SEC(".maps");

/* Not pinned: rebuilt by every edge that loads the programs. The LRU map evicts the least
 * recently used sources, so a flood of spoofed sources cannot exhaust memory. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct edge_bucket_key);
	__type(value, struct edge_bucket);
	__uint(max_entries, EDGE_BUCKETS_MAX);
} edge_buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct edge_port_key);
	__type(value, __u32);
	__uint(max_entries, EDGE_PORTS_MAX);
} edge_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct edge_steer_config);
	__uint(max_entries, 1);
} edge_steer SEC(".maps");

/* CPU number -> worker id + 1; 0 means no worker runs on that CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, EDGE_CPUS_MAX);
} edge_cpu_worker SEC(".maps");

/* One socket array per SO_REUSEPORT group, indexed by worker id: the kernel only selects a
 * socket of the group that received the connection. */
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, EDGE_WORKERS_MAX);
} edge_socks_http SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, EDGE_WORKERS_MAX);
} edge_socks_https SEC(".maps");

/* The workers' UDP sockets of the HTTP/3 endpoints. */
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, EDGE_WORKERS_MAX);
} edge_socks_quic SEC(".maps");

/* QUIC version 1 (RFC 9000) and version 2 (RFC 9369). */
#define QUIC_V1 0x00000001
#define QUIC_V2 0x6b3343cf
/* RFC 9000 section 14.1: a server discards an Initial packet in a smaller UDP datagram. */
#define QUIC_MIN_INITIAL_DATAGRAM 1200
#define QUIC_MAX_CID_LEN 20

/* Refill of a bucket is computed over at most this long, so the product cannot overflow. */
#define BUCKET_MAX_ELAPSED_NS 1000000000000ULL
#define RATE_MAX 1000000

static __always_inline int count(__u32 stat)
{
	__u64 *counter = bpf_map_lookup_elem(&edge_stats, &stat);

	if (counter)
		*counter += 1;
	return 0;
}

static __always_inline int verdict(__u32 stat, int action)
{
	count(stat);
	return action;
}

static __always_inline int blocked(const struct edge_block *entry)
{
	if (!entry)
		return 0;
	return entry->expires_ns == 0 || bpf_ktime_get_ns() < entry->expires_ns;
}

static __always_inline int is_our_port(__u16 port, __u8 proto)
{
	struct edge_port_key key = { .port = port, .proto = proto, .pad = 0 };

	return bpf_map_lookup_elem(&edge_ports, &key) != NULL;
}

/* Takes one token from the bucket of the source prefix around `addr` (IPv4 as
 * ::ffff:a.b.c.d when `is_v4`); returns 1 when the packet may pass. */
static __always_inline int take_token(const __u8 *addr, int is_v4, __u32 kind)
{
	__u32 zero = 0;
	struct edge_limits *limits = bpf_map_lookup_elem(&edge_limits, &zero);
	__u64 rate, burst;

	if (!limits)
		return 1;
	if (kind == EDGE_BUCKET_SYN) {
		rate = limits->syn_rate;
		burst = limits->syn_burst;
	} else if (kind == EDGE_BUCKET_QUIC) {
		rate = limits->quic_rate;
		burst = limits->quic_burst;
	} else {
		rate = limits->abuse_rate;
		burst = limits->abuse_burst;
	}
	if (rate == 0)
		return 1;
	if (rate > RATE_MAX)
		rate = RATE_MAX;
	if (burst == 0)
		burst = 1;

	/* The prefix over the 128-bit key: an IPv4 prefix follows the 96 bits of ::ffff:. */
	__u32 prefix_len;
	if (kind == EDGE_BUCKET_ABUSE)
		/* Abuse is counted per address: a block covers only the address that abused. */
		prefix_len = 128;
	else if (is_v4)
		prefix_len = 96 + (limits->v4_prefix_len < 32 ? limits->v4_prefix_len : 32);
	else
		prefix_len = limits->v6_prefix_len < 128 ? limits->v6_prefix_len : 128;

	struct edge_bucket_key key = { .kind = kind };
	__builtin_memcpy(key.addr, addr, 16);
#pragma unroll
	for (int i = 0; i < 16; i++) {
		__u32 bits = prefix_len > i * 8 ? prefix_len - i * 8 : 0;

		if (bits < 8)
			key.addr[i] &= (__u8)(0xff00 >> bits);
	}
	__u64 now = bpf_ktime_get_ns();
	__u64 max_tokens = burst * 1000;
	struct edge_bucket *bucket = bpf_map_lookup_elem(&edge_buckets, &key);

	if (!bucket) {
		struct edge_bucket fresh = { .tokens_milli = max_tokens - 1000, .last_ns = now };

		bpf_map_update_elem(&edge_buckets, &key, &fresh, BPF_ANY);
		return 1;
	}

	/* NOTE: two CPUs may update one bucket at the same time, and one refill or take is then
	 * lost. The limit is approximate under that race, never unbounded. */
	__u64 elapsed = now > bucket->last_ns ? now - bucket->last_ns : 0;
	if (elapsed > BUCKET_MAX_ELAPSED_NS)
		elapsed = BUCKET_MAX_ELAPSED_NS;
	/* tokens/s * ns / 1e9 * 1000 (thousandths) = elapsed * rate / 1e6 */
	__u64 tokens = bucket->tokens_milli + elapsed * rate / 1000000;
	if (tokens > max_tokens)
		tokens = max_tokens;
	bucket->last_ns = now;
	if (tokens < 1000) {
		bucket->tokens_milli = tokens;
		return 0;
	}
	bucket->tokens_milli = tokens - 1000;
	return 1;
}

/* Drops a malformed packet to our ports, and blocks its sender for `abuse_block_secs` once
 * its abuse bucket is empty. */
static __always_inline int malformed(const __u8 *src, int is_v4)
{
	if (take_token(src, is_v4, EDGE_BUCKET_ABUSE))
		return verdict(EDGE_STAT_DROP_MALFORMED, XDP_DROP);

	__u32 zero = 0;
	struct edge_limits *limits = bpf_map_lookup_elem(&edge_limits, &zero);
	__u64 secs = limits && limits->abuse_block_secs ? limits->abuse_block_secs : 60;
	struct edge_block entry = {
		.expires_ns = bpf_ktime_get_ns() + secs * 1000000000ULL,
		.origin = EDGE_BLOCK_AUTO,
	};

	/* NOTE: a spoofed source address gets blocked as well, which is why automatic blocking
	 * is off unless the agent turns it on. */
	if (is_v4) {
		struct edge_lpm_v4_key key = { .prefixlen = 32 };

		__builtin_memcpy(key.addr, src + 12, 4);
		bpf_map_update_elem(&edge_block_v4, &key, &entry, BPF_ANY);
	} else {
		struct edge_lpm_v6_key key = { .prefixlen = 128 };

		__builtin_memcpy(key.addr, src, 16);
		bpf_map_update_elem(&edge_block_v6, &key, &entry, BPF_ANY);
	}
	count(EDGE_STAT_AUTO_BLOCKED);
	return verdict(EDGE_STAT_DROP_MALFORMED, XDP_DROP);
}

/* Checks a TCP segment; `l4` points at the TCP header. */
static __always_inline int handle_tcp(void *l4, void *end, const __u8 *src, int is_v4)
{
	struct tcphdr *tcp = l4;

	/* Without the ports it is unknown whether the segment is for us. */
	if (l4 + 4 > end)
		return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);
	if (!is_our_port(tcp->dest, IPPROTO_TCP))
		return verdict(EDGE_STAT_PASS_OTHER, XDP_PASS);
	if ((void *)(tcp + 1) > end)
		return malformed(src, is_v4);
	if (tcp->doff < 5 || l4 + tcp->doff * 4 > end)
		return malformed(src, is_v4);

	/* Every valid segment has SYN, ACK or RST; SYN never comes with FIN or RST. */
	if (!(tcp->syn || tcp->ack || tcp->rst))
		return malformed(src, is_v4);
	if (tcp->syn && (tcp->fin || tcp->rst))
		return malformed(src, is_v4);

	if (tcp->syn && !tcp->ack && !take_token(src, is_v4, EDGE_BUCKET_SYN))
		return verdict(EDGE_STAT_DROP_SYN_RATE, XDP_DROP);
	return verdict(EDGE_STAT_PASS_ALLOWED, XDP_PASS);
}

/* Checks a UDP datagram; `l4` points at the UDP header. */
static __always_inline int handle_udp(void *l4, void *end, const __u8 *src, int is_v4)
{
	struct udphdr *udp = l4;

	if (l4 + 4 > end)
		return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);
	if (!is_our_port(udp->dest, IPPROTO_UDP))
		return verdict(EDGE_STAT_PASS_OTHER, XDP_PASS);
	if ((void *)(udp + 1) > end)
		return malformed(src, is_v4);

	__u32 len = bpf_ntohs(udp->len);
	if (len < sizeof(*udp) || l4 + len > end)
		return malformed(src, is_v4);

	__u8 *quic = (__u8 *)(udp + 1);
	if ((void *)(quic + 1) > end)
		return malformed(src, is_v4);
	/* Short header: a packet of an established connection. */
	if (!(quic[0] & 0x80))
		return verdict(EDGE_STAT_PASS_ALLOWED, XDP_PASS);
	/* Long header: flags, version (4 bytes), destination connection ID length. */
	if ((void *)(quic + 6) > end)
		return malformed(src, is_v4);

	__u32 version = ((__u32)quic[1] << 24) | ((__u32)quic[2] << 16) | ((__u32)quic[3] << 8) |
			quic[4];
	__u8 type = (quic[0] >> 4) & 3;
	int initial;

	if (version == 0)
		/* Version Negotiation: only servers send it; the QUIC stack ignores it. */
		return verdict(EDGE_STAT_PASS_ALLOWED, XDP_PASS);
	if (version == QUIC_V1) {
		initial = type == 0;
	} else if (version == QUIC_V2) {
		initial = type == 1;
	} else {
		/* A packet of an unknown version can only start a connection, which the server
		 * rejects with Version Negotiation, so it costs what an Initial costs. */
		initial = 1;
	}
	if ((version == QUIC_V1 || version == QUIC_V2) && quic[5] > QUIC_MAX_CID_LEN)
		return malformed(src, is_v4);
	if (!initial)
		return verdict(EDGE_STAT_PASS_ALLOWED, XDP_PASS);
	if (len - sizeof(*udp) < QUIC_MIN_INITIAL_DATAGRAM)
		return malformed(src, is_v4);
	if (!take_token(src, is_v4, EDGE_BUCKET_QUIC))
		return verdict(EDGE_STAT_DROP_QUIC_RATE, XDP_DROP);
	return verdict(EDGE_STAT_PASS_ALLOWED, XDP_PASS);
}

static __always_inline int handle_ipv4(void *l3, void *end)
{
	struct iphdr *ip = l3;

	if ((void *)(ip + 1) > end)
		return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);

	struct edge_lpm_v4_key key = { .prefixlen = 32 };
	__builtin_memcpy(key.addr, &ip->saddr, 4);
	if (blocked(bpf_map_lookup_elem(&edge_block_v4, &key)))
		return verdict(EDGE_STAT_DROP_BLOCKED, XDP_DROP);

	if (ip->protocol == IPPROTO_ICMP)
		return verdict(EDGE_STAT_PASS_ICMP, XDP_PASS);
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return verdict(EDGE_STAT_PASS_OTHER, XDP_PASS);
	if (ip->ihl < 5)
		return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);
	/* A later fragment carries no ports; the kernel reassembles it or drops it. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);

	__u8 src[16] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	__builtin_memcpy(src + 12, &ip->saddr, 4);
	void *l4 = l3 + ip->ihl * 4;
	if (ip->protocol == IPPROTO_TCP)
		return handle_tcp(l4, end, src, 1);
	return handle_udp(l4, end, src, 1);
}

/* IPv6 extension headers that the filter skips to find TCP or UDP. */
#define IPV6_EXT_MAX 4

static __always_inline int handle_ipv6(void *l3, void *end)
{
	struct ipv6hdr *ip = l3;

	if ((void *)(ip + 1) > end)
		return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);

	struct edge_lpm_v6_key key = { .prefixlen = 128 };
	__builtin_memcpy(key.addr, &ip->saddr, 16);
	if (blocked(bpf_map_lookup_elem(&edge_block_v6, &key)))
		return verdict(EDGE_STAT_DROP_BLOCKED, XDP_DROP);

	__u8 next = ip->nexthdr;
	void *cursor = (void *)(ip + 1);

#pragma unroll
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		__u8 *ext = cursor;

		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS &&
		    next != IPPROTO_FRAGMENT && next != IPPROTO_AH)
			break;
		if ((void *)(ext + 8) > end)
			return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);
		if (next == IPPROTO_FRAGMENT) {
			/* A later fragment carries no ports. */
			if ((ext[2] << 8 | ext[3]) & 0xfff8)
				return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);
			cursor += 8;
		} else if (next == IPPROTO_AH) {
			cursor += (ext[1] + 2) * 4;
		} else {
			cursor += (ext[1] + 1) * 8;
		}
		next = ext[0];
	}

	if (next == IPPROTO_ICMPV6)
		return verdict(EDGE_STAT_PASS_ICMP, XDP_PASS);
	if (next == IPPROTO_TCP)
		return handle_tcp(cursor, end, (const __u8 *)&ip->saddr, 0);
	if (next == IPPROTO_UDP)
		return handle_udp(cursor, end, (const __u8 *)&ip->saddr, 0);
	if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS ||
	    next == IPPROTO_FRAGMENT || next == IPPROTO_AH)
		return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);
	return verdict(EDGE_STAT_PASS_OTHER, XDP_PASS);
}

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

SEC("xdp")
int edge_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);

	__be16 proto = eth->h_proto;
	void *l3 = (void *)(eth + 1);

	/* Up to two VLAN tags (802.1Q, 802.1ad). */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlan_hdr *vlan = l3;

		if ((void *)(vlan + 1) > end)
			return verdict(EDGE_STAT_PASS_UNPARSED, XDP_PASS);
		proto = vlan->proto;
		l3 = (void *)(vlan + 1);
	}

	if (proto == bpf_htons(ETH_P_IP))
		return handle_ipv4(l3, end);
	if (proto == bpf_htons(ETH_P_IPV6))
		return handle_ipv6(l3, end);
	return verdict(EDGE_STAT_PASS_NOT_IP, XDP_PASS);
}

static __always_inline int steer(struct sk_reuseport_md *md, void *socks)
{
	__u32 zero = 0;
	struct edge_steer_config *config = bpf_map_lookup_elem(&edge_steer, &zero);

	if (!config || config->workers == 0)
		return verdict(EDGE_STAT_STEER_DEFAULT, SK_PASS);

	if (config->mode == EDGE_STEER_CPU) {
		__u32 cpu = bpf_get_smp_processor_id();
		__u32 *worker = bpf_map_lookup_elem(&edge_cpu_worker, &cpu);

		if (worker && *worker) {
			__u32 index = *worker - 1;

			if (bpf_sk_select_reuseport(md, socks, &index, 0) == 0)
				return verdict(EDGE_STAT_STEER_CPU, SK_PASS);
		}
	}

	__u32 index = md->hash % config->workers;
	if (bpf_sk_select_reuseport(md, socks, &index, 0) == 0)
		return verdict(EDGE_STAT_STEER_HASH, SK_PASS);
	/* The chosen worker's socket is closed: the kernel picks one of the others. */
	return verdict(EDGE_STAT_STEER_DEFAULT, SK_PASS);
}

SEC("sk_reuseport")
int edge_steer_http(struct sk_reuseport_md *md)
{
	return steer(md, &edge_socks_http);
}

SEC("sk_reuseport")
int edge_steer_https(struct sk_reuseport_md *md)
{
	return steer(md, &edge_socks_https);
}

/* Long header: flags (1), version (4), destination connection ID length (1), then the ID. */
#define QUIC_LONG_DCID_OFFSET 6
/* Short header: flags (1), then the destination connection ID, whose length is not sent. */
#define QUIC_SHORT_DCID_OFFSET 1

/* Returns the worker id in the destination connection ID of a QUIC datagram, or -1 when the
 * datagram carries no ID of the edge's length. For UDP the context's data starts at the UDP
 * header, and bpf_skb_load_bytes fails on a datagram too short for the bytes it reads.
 *
 * Only the layout that RFC 8999 fixes for every QUIC version is read. The fixed bit (0x40) is
 * not checked, because quinn lets peers grease it (RFC 9287). */
static __always_inline int quic_dcid_worker(struct sk_reuseport_md *md)
{
	__u8 head[QUIC_LONG_DCID_OFFSET + EDGE_QUIC_CID_LEN];
	const __u32 quic = sizeof(struct udphdr);

	if (bpf_skb_load_bytes(md, quic, head, 1))
		return -1;
	if (!(head[0] & 0x80)) {
		/* Short header: the ID's length is not sent, so it is read at our length. A short
		 * header only follows a handshake with this edge, which issued the ID. */
		if (bpf_skb_load_bytes(md, quic, head, QUIC_SHORT_DCID_OFFSET + EDGE_QUIC_CID_LEN))
			return -1;
		return head[QUIC_SHORT_DCID_OFFSET];
	}
	if (bpf_skb_load_bytes(md, quic, head, sizeof(head)))
		return -1;
	/* Version 0 is Version Negotiation, which only servers send. */
	if (head[1] == 0 && head[2] == 0 && head[3] == 0 && head[4] == 0)
		return -1;
	/* A client's first Initial carries an ID that the client chose, usually of another
	 * length. Handshake packets, and Initial and 0-RTT packets after a Retry, carry ours. */
	if (head[QUIC_LONG_DCID_OFFSET - 1] != EDGE_QUIC_CID_LEN)
		return -1;
	return head[QUIC_LONG_DCID_OFFSET];
}

/* Sends each QUIC datagram to the worker whose id its destination connection ID carries, so
 * that a connection keeps its worker when the client's address or port changes. A datagram
 * without such an ID, or whose worker has no socket, goes by the flow hash, which is stable for
 * one client address and port. Nothing is dropped: a datagram that no rule places is left to
 * the kernel's own choice.
 *
 * NOTE: a client-chosen ID of our length whose first byte names a live worker is steered by
 * that byte. The choice is still a function of the ID alone, so every datagram that carries
 * the ID reaches the same worker, which is all a handshake needs. */
SEC("sk_reuseport")
int edge_steer_quic(struct sk_reuseport_md *md)
{
	__u32 zero = 0;
	struct edge_steer_config *config = bpf_map_lookup_elem(&edge_steer, &zero);

	if (!config || config->workers == 0)
		return verdict(EDGE_STAT_STEER_QUIC_DEFAULT, SK_PASS);

	int worker = quic_dcid_worker(md);
	if (worker >= 0) {
		__u32 index = worker;

		if (bpf_sk_select_reuseport(md, &edge_socks_quic, &index, 0) == 0)
			return verdict(EDGE_STAT_STEER_QUIC_CID, SK_PASS);
	}

	/* Not by the receiving CPU as for TCP: the datagrams of one Initial flight can arrive on
	 * different CPUs, and all of them must reach the same worker. */
	__u32 index = md->hash % config->workers;
	if (bpf_sk_select_reuseport(md, &edge_socks_quic, &index, 0) == 0)
		return verdict(EDGE_STAT_STEER_QUIC_HASH, SK_PASS);
	return verdict(EDGE_STAT_STEER_QUIC_DEFAULT, SK_PASS);
}

char LICENSE[] SEC("license") = "Apache-2.0";
