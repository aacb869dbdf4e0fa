//! The one socket setting both ends of a Unix socket connection share (the rest of this
//! crate does no I/O): the send buffer; and a probe for free local ports (test harnesses and
//! `sluice-bench --spawn` start servers on them).

use std::os::fd::RawFd;

/// A base port with `n` consecutive free ports on 127.0.0.1 (a node's shard k listens on
/// base + k), taken below the kernel's ephemeral range: a port the kernel hands out would be
/// free when probed yet could be taken by any outgoing connection (a client's, while a server
/// restarts) before the server binds it. Spread by process id and a counter so parallel
/// callers do not collide; `None` if 500 tries found none.
pub fn free_local_ports(n: u16) -> Option<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let (low, span) = (20_000u32, 12_000u32);
    (0..500).find_map(|_| {
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = (low + std::process::id().wrapping_mul(7919).wrapping_add(k.wrapping_mul(104_729)) % span) as u16;
        (0..n.max(1)).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()).then_some(base)
    })
}

/// How an endpoint or address names a Unix socket: `unix:PATH`.
pub const UNIX_SCHEME: &str = "unix:";

/// The send buffer asked for on a Unix socket. A Unix stream socket's writer may have only
/// its send buffer's worth of data queued to the reader, and the default (`wmem_default`,
/// 208 KiB) is a few hundred microseconds of a client writing 1 GB/s: the writer then
/// stops and waits for the reader at every step (1 KB events: 0.54M/s against 0.99M/s
/// with 4 MiB here). Loopback TCP grows its buffers to 4 MiB by itself.
pub const UNIX_SEND_BUFFER_BYTES: libc::c_int = 4 << 20;

/// Asks for `UNIX_SEND_BUFFER_BYTES` of send buffer on socket `fd`: beyond
/// `net.core.wmem_max` if the process may (`CAP_NET_ADMIN`), else up to it. `false` if both
/// were refused (the default stays).
pub fn widen_send_buffer(fd: RawFd) -> bool {
    let set = |option: libc::c_int| {
        let n = UNIX_SEND_BUFFER_BYTES;
        // SAFETY: setsockopt on a descriptor the caller holds open, with a c_int value.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&raw const n).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    set(libc::SO_SNDBUFFORCE) || set(libc::SO_SNDBUF)
}
