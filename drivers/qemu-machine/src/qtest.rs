//! The qtest line-protocol client: writing commands, matching answers to callers, and tracking
//! the interrupt lines QEMU reports asynchronously.
//!
//! Protocol: one command per line (`readl 0xc0000012`, `outl 0xcf8 0x80000800`, ...); QEMU
//! answers every command, in order, with one line: `OK`, `OK <value>`, `FAIL ...` or `ERR ...`.
//! Between answers it may send `IRQ raise N` / `IRQ lower N` (after `irq_intercept_in`).
//!
//! Design: callers push a waiter on a FIFO and write their line while holding the writer lock,
//! so the FIFO order is the socket order. One reader thread ([`run_reader`]) reads every line:
//! an answer completes the waiter at the front of the FIFO, an IRQ line updates the tracked
//! levels and wakes [`Qtest::wait_irq`]. A posted write pushes a waiter nobody waits for and
//! returns after one `send`. When the socket ends, everything pending fails with
//! [`PlatformError::Gone`], and so does every later call.
//!
//! Ordering verified on QEMU 7.2 (TCG and KVM): QEMU answers a notify write with `OK` before the
//! device completes the request and raises the line (`OK` then `IRQ raise 21` for the device at
//! 00:01.0); reading the virtio ISR register produces `IRQ lower 21` *before* the read's
//! `OK 0x...01`. The reader handles lines in socket order, so when the ISR read returns to its
//! caller the tracked level is already low, and a following `wait_irq` does not see a stale
//! assertion.

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use platform::{IrqWait, PlatformError, Result, Width};

/// Longest line accepted from QEMU; anything longer is a protocol error.
const MAX_LINE: u64 = 64 * 1024;

/// Locks a mutex, ignoring poisoning: every critical section here leaves the state consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The qtest suffix for an access width (`readb`, `outw`, ...).
pub(crate) fn width_suffix(width: Width) -> char {
    match width {
        Width::U8 => 'b',
        Width::U16 => 'w',
        Width::U32 => 'l',
        Width::U64 => 'q',
    }
}

/// Parses a qtest value: `0x` and 1 to 16 hex digits, nothing else.
pub(crate) fn parse_hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x")?;
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// What QEMU answered to one command.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    /// `OK` with what followed it (empty for a bare `OK`).
    Ok(String),
    /// The whole `FAIL ...` or `ERR ...` line.
    Fail(String),
}

/// A one-shot place where the reader thread puts an answer for a waiting caller.
#[derive(Default)]
struct Slot {
    value: Mutex<Option<Result<Answer>>>,
    cv: Condvar,
}

impl Slot {
    fn fill(&self, value: Result<Answer>) {
        *lock(&self.value) = Some(value);
        self.cv.notify_one();
    }

    fn wait(&self, timeout: Duration) -> Result<Answer> {
        let deadline = Instant::now() + timeout;
        let mut guard = lock(&self.value);
        loop {
            if let Some(v) = guard.take() {
                return v;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PlatformError::Protocol(format!(
                    "QEMU did not answer a qtest command within {timeout:?}"
                )));
            }
            guard = self
                .cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Who gets the answer to a command that was sent.
enum Waiter {
    /// A posted MMIO write: nobody waits; a failure is remembered for the next call.
    Posted { addr: u64, value: u64 },
    /// A caller waiting on its slot.
    Reply(Arc<Slot>),
}

struct State {
    /// Commands sent and not yet answered, in socket order.
    pending: VecDeque<Waiter>,
    /// Why the machine is gone, once it is.
    gone: Option<String>,
    /// Level of ioapic input `n` is bit `n`.
    irq_levels: u64,
    /// A failed posted write, returned by the next call.
    posted_error: Option<PlatformError>,
}

/// State shared between callers and the reader thread.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled on IRQ level changes and when the machine goes away.
    irq_cv: Condvar,
}

impl Shared {
    pub(crate) fn new() -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                gone: None,
                irq_levels: 0,
                posted_error: None,
            }),
            irq_cv: Condvar::new(),
        })
    }

    /// Marks the machine gone (the first reason wins), fails every pending waiter and wakes
    /// every `wait_irq`. Returns false when it was gone already.
    pub(crate) fn mark_gone(&self, reason: String) -> bool {
        let pending = {
            let mut st = lock(&self.state);
            if st.gone.is_some() {
                return false;
            }
            st.gone = Some(reason.clone());
            std::mem::take(&mut st.pending)
        };
        log::debug!("qemu machine gone: {reason}");
        for w in pending {
            if let Waiter::Reply(slot) = w {
                slot.fill(Err(PlatformError::Gone(reason.clone())));
            }
        }
        self.irq_cv.notify_all();
        true
    }

    /// `Some(reason)` once the machine is gone.
    pub(crate) fn gone(&self) -> Option<String> {
        lock(&self.state).gone.clone()
    }

    /// Current level of ioapic input `line`.
    pub(crate) fn irq_level(&self, line: u8) -> bool {
        line < 64 && lock(&self.state).irq_levels & (1u64 << line) != 0
    }

    fn handle_line(&self, line: &str) -> std::result::Result<(), String> {
        if let Some(rest) = line.strip_prefix("IRQ ") {
            let mut words = rest.split(' ');
            let (Some(dir), Some(num), None) = (words.next(), words.next(), words.next()) else {
                return Err(format!("malformed IRQ line `{line}`"));
            };
            let raise = match dir {
                "raise" => true,
                "lower" => false,
                _ => return Err(format!("malformed IRQ line `{line}`")),
            };
            let num: u32 = num
                .parse()
                .map_err(|_| format!("malformed IRQ number in `{line}`"))?;
            if num >= 64 {
                log::warn!("ignoring qtest IRQ line {num}: out of the tracked range");
                return Ok(());
            }
            {
                let mut st = lock(&self.state);
                if raise {
                    st.irq_levels |= 1 << num;
                } else {
                    st.irq_levels &= !(1 << num);
                }
            }
            if raise {
                self.irq_cv.notify_all();
            }
            return Ok(());
        }

        let answer = if line == "OK" {
            Answer::Ok(String::new())
        } else if let Some(rest) = line.strip_prefix("OK ") {
            Answer::Ok(rest.to_string())
        } else if ["FAIL", "ERR"]
            .iter()
            .any(|p| line == *p || line.strip_prefix(p).is_some_and(|r| r.starts_with(' ')))
        {
            Answer::Fail(line.to_string())
        } else {
            return Err(format!("unexpected line `{}`", line.escape_debug()));
        };

        let waiter = {
            let mut st = lock(&self.state);
            let Some(w) = st.pending.pop_front() else {
                return Err(format!("answer `{line}` with no command pending"));
            };
            if let (Waiter::Posted { addr, value }, Answer::Fail(msg)) = (&w, &answer) {
                log::error!("posted qtest write of {value:#x} to {addr:#x} failed: {msg}");
                st.posted_error = Some(PlatformError::Protocol(format!(
                    "an earlier posted write of {value:#x} to {addr:#x} failed: {msg}"
                )));
            }
            w
        };
        if let Waiter::Reply(slot) = waiter {
            slot.fill(Ok(answer));
        }
        Ok(())
    }
}

/// Reads lines from QEMU until the socket ends or QEMU says something this client does not
/// understand. Returns why it stopped; the caller turns that into the "gone" reason.
pub(crate) fn run_reader(shared: &Shared, stream: UnixStream) -> String {
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf) {
            Ok(0) => return "the qtest socket was closed by QEMU".to_string(),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return format!("reading the qtest socket failed: {e}"),
        }
        if buf.last() != Some(&b'\n') {
            if buf.len() as u64 >= MAX_LINE {
                return format!("qtest protocol error: a line longer than {MAX_LINE} bytes");
            }
            return "the qtest socket was closed by QEMU in the middle of a line".to_string();
        }
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            return format!(
                "qtest protocol error: a line that is not UTF-8: {}",
                String::from_utf8_lossy(&buf).escape_debug()
            );
        };
        if let Err(e) = shared.handle_line(line) {
            // The stream can no longer be matched to commands: nothing later can be trusted.
            let _ = reader.get_ref().shutdown(std::net::Shutdown::Both);
            return format!("qtest protocol error: {e}");
        }
    }
}

struct Writer {
    stream: UnixStream,
    buf: String,
}

/// The command side of the qtest connection.
pub(crate) struct Qtest {
    writer: Mutex<Writer>,
    shared: Arc<Shared>,
    answer_timeout: Duration,
}

impl Qtest {
    /// A client writing to `stream`; the reader thread must run [`run_reader`] on a clone of it
    /// with the same `shared`.
    pub(crate) fn new(stream: UnixStream, shared: Arc<Shared>, answer_timeout: Duration) -> Qtest {
        Qtest {
            writer: Mutex::new(Writer {
                stream,
                buf: String::with_capacity(256),
            }),
            shared,
            answer_timeout,
        }
    }

    /// The state shared with the reader thread.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Queues the waiters and writes the lines with one `send`, all under the writer lock, so
    /// that lines of one call are adjacent on the socket and the FIFO matches the socket order.
    fn submit<const N: usize>(
        &self,
        lines: [fmt::Arguments<'_>; N],
        waiters: [Waiter; N],
    ) -> Result<()> {
        let mut w = lock(&self.writer);
        {
            let mut st = lock(&self.shared.state);
            if let Some(reason) = &st.gone {
                return Err(PlatformError::Gone(reason.clone()));
            }
            if let Some(e) = st.posted_error.take() {
                return Err(e);
            }
            st.pending.extend(waiters);
        }
        let Writer { stream, buf } = &mut *w;
        buf.clear();
        for line in lines {
            // Writing into a String cannot fail.
            let _ = writeln!(buf, "{line}");
        }
        if let Err(e) = send_all(stream, buf.as_bytes()) {
            // The reader thread sees the end of the stream too and fails what is pending
            // (with QEMU's exit status and log); this caller learns it now.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Err(PlatformError::Gone(format!(
                "writing to the qtest socket failed: {e}"
            )));
        }
        Ok(())
    }

    fn check(cmd: fmt::Arguments<'_>, answer: Answer) -> Result<String> {
        match answer {
            Answer::Ok(rest) => Ok(rest),
            Answer::Fail(msg) => Err(PlatformError::Protocol(format!(
                "qtest command `{cmd}` failed: {msg}"
            ))),
        }
    }

    /// Sends one command and waits for its answer; returns what followed `OK`.
    pub(crate) fn command(&self, cmd: fmt::Arguments<'_>) -> Result<String> {
        let slot = Arc::new(Slot::default());
        self.submit([cmd], [Waiter::Reply(slot.clone())])?;
        Self::check(cmd, slot.wait(self.answer_timeout)?)
    }

    /// Sends one command whose answer must be `OK 0x<hex>`, and returns the value.
    pub(crate) fn command_value(&self, cmd: fmt::Arguments<'_>) -> Result<u64> {
        let rest = self.command(cmd)?;
        parse_hex(&rest).ok_or_else(|| {
            PlatformError::Protocol(format!("qtest command `{cmd}`: bad value `{rest}`"))
        })
    }

    /// Sends two commands back to back (no other line between them on the socket) and waits
    /// for both answers.
    pub(crate) fn command_pair(
        &self,
        first: fmt::Arguments<'_>,
        second: fmt::Arguments<'_>,
    ) -> Result<(String, String)> {
        let a = Arc::new(Slot::default());
        let b = Arc::new(Slot::default());
        self.submit(
            [first, second],
            [Waiter::Reply(a.clone()), Waiter::Reply(b.clone())],
        )?;
        let ra = a.wait(self.answer_timeout)?;
        let rb = b.wait(self.answer_timeout)?;
        Ok((Self::check(first, ra)?, Self::check(second, rb)?))
    }

    /// Sends a write without waiting for its answer (one `send`, no round trip). A `FAIL`
    /// answer is logged and returned by the next call.
    pub(crate) fn post(&self, cmd: fmt::Arguments<'_>, addr: u64, value: u64) -> Result<()> {
        self.submit([cmd], [Waiter::Posted { addr, value }])
    }

    /// Waits until one of the ioapic inputs in `mask` is high, or `timeout` passes.
    pub(crate) fn wait_irq(&self, mask: u64, timeout: Option<Duration>) -> Result<IrqWait> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(reason) = &st.gone {
                return Err(PlatformError::Gone(reason.clone()));
            }
            if let Some(e) = st.posted_error.take() {
                return Err(e);
            }
            if st.irq_levels & mask != 0 {
                return Ok(IrqWait::Asserted);
            }
            st = match (timeout, deadline) {
                // A timeout too large for an Instant: wait as if forever.
                (None, _) | (Some(_), None) => self
                    .shared
                    .irq_cv
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner),
                (Some(_), Some(deadline)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(IrqWait::TimedOut);
                    }
                    self.shared
                        .irq_cv
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

/// Writes all of `bytes` with `send(MSG_NOSIGNAL)`: a peer that died gives `EPIPE`, never a
/// SIGPIPE that would kill a process that did not ignore it.
pub(crate) fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: the fd is the open socket owned by `stream`; `bytes` is a valid buffer of
        // `bytes.len()` bytes for the duration of the call.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // `n` is non-negative and at most `bytes.len()` here.
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::thread;

    #[test]
    fn hex_parsing_is_strict() {
        assert_eq!(parse_hex("0x10481af4"), Some(0x1048_1af4));
        assert_eq!(parse_hex("0x0000000000000001"), Some(1));
        assert_eq!(parse_hex("0xFFFFFFFFFFFFFFFF"), Some(u64::MAX));
        for bad in [
            "",
            "0x",
            "10",
            "0x1g",
            "0x 1",
            "0x00000000000000001",
            "-0x1",
            "0x1 ",
        ] {
            assert_eq!(parse_hex(bad), None, "{bad:?}");
        }
    }

    /// A fake QEMU on the other end of a socket pair.
    fn pair() -> (Qtest, Arc<Shared>, UnixStream, thread::JoinHandle<String>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let shared = Shared::new();
        let reader = ours.try_clone().unwrap();
        let s2 = shared.clone();
        let h = thread::spawn(move || {
            let cause = run_reader(&s2, reader);
            s2.mark_gone(cause.clone());
            cause
        });
        (
            Qtest::new(ours, shared.clone(), Duration::from_secs(5)),
            shared,
            theirs,
            h,
        )
    }

    fn read_line(r: &mut BufReader<UnixStream>) -> String {
        let mut s = String::new();
        r.read_line(&mut s).unwrap();
        s
    }

    #[test]
    fn answers_irqs_posted_failures_and_eof() {
        let (qt, shared, theirs, h) = pair();
        let mut qemu_in = BufReader::new(theirs.try_clone().unwrap());
        let mut qemu_out = theirs;
        thread::scope(|s| {
            let q = &qt;
            let t = s.spawn(move || q.command_value(format_args!("readl 0x{:x}", 0x1000)));
            assert_eq!(read_line(&mut qemu_in), "readl 0x1000\n");
            qemu_out
                .write_all(b"IRQ raise 21\nOK 0x0000000000000007\n")
                .unwrap();
            assert_eq!(t.join().unwrap(), Ok(7));
        });
        assert!(shared.irq_level(21));
        assert_eq!(qt.wait_irq(1 << 21, None), Ok(IrqWait::Asserted));
        assert_eq!(
            qt.wait_irq(1 << 20, Some(Duration::from_millis(10))),
            Ok(IrqWait::TimedOut)
        );

        // A posted write that fails poisons the next call only.
        qt.post(format_args!("writel 0x10 0x1"), 0x10, 1).unwrap();
        assert_eq!(read_line(&mut qemu_in), "writel 0x10 0x1\n");
        qemu_out.write_all(b"FAIL nope\n").unwrap();
        while lock(&shared.state).posted_error.is_none() {
            thread::sleep(Duration::from_millis(1));
        }
        let err = qt.command(format_args!("outl 0xcf8 0x0")).unwrap_err();
        assert!(
            matches!(&err, PlatformError::Protocol(m) if m.contains("posted write")),
            "{err}"
        );
        // Only once: the next call goes through.
        thread::scope(|s| {
            let q = &qt;
            let t = s.spawn(move || q.command(format_args!("outl 0xcf8 0x0")));
            assert_eq!(read_line(&mut qemu_in), "outl 0xcf8 0x0\n");
            qemu_out.write_all(b"OK\n").unwrap();
            assert_eq!(t.join().unwrap(), Ok(String::new()));
        });

        // A FAIL answer fails that call with a protocol error.
        thread::scope(|s| {
            let q = &qt;
            let t = s.spawn(move || q.command(format_args!("bogus")));
            assert_eq!(read_line(&mut qemu_in), "bogus\n");
            qemu_out
                .write_all(b"FAIL Unknown command 'bogus'\n")
                .unwrap();
            assert!(matches!(t.join().unwrap(), Err(PlatformError::Protocol(_))));
        });

        // EOF: a blocked waiter and later calls get Gone.
        thread::scope(|s| {
            let q = &qt;
            let t = s.spawn(move || q.command(format_args!("inl 0xcfc")));
            let w = s.spawn(move || q.wait_irq(1 << 3, None));
            assert_eq!(read_line(&mut qemu_in), "inl 0xcfc\n");
            drop(qemu_out);
            drop(qemu_in);
            assert!(matches!(t.join().unwrap(), Err(PlatformError::Gone(_))));
            assert!(matches!(w.join().unwrap(), Err(PlatformError::Gone(_))));
        });
        assert!(matches!(
            qt.command(format_args!("inl 0xcfc")),
            Err(PlatformError::Gone(_))
        ));
        assert!(h.join().unwrap().contains("closed"));
    }

    #[test]
    fn garbage_is_fatal() {
        let (qt, shared, mut theirs, h) = pair();
        theirs.write_all(b"HELLO\n").unwrap();
        let cause = h.join().unwrap();
        assert!(cause.contains("unexpected line"), "{cause}");
        assert!(shared.gone().is_some());
        assert!(matches!(
            qt.command(format_args!("inl 0xcfc")),
            Err(PlatformError::Gone(_))
        ));
    }

    #[test]
    fn answer_without_command_is_fatal() {
        let (_qt, _shared, mut theirs, h) = pair();
        theirs.write_all(b"OK\n").unwrap();
        assert!(h.join().unwrap().contains("no command pending"));
    }
}
