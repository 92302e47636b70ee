//! The QMP (QEMU Machine Protocol) client: connects lazily to QEMU's QMP socket, negotiates
//! capabilities, executes one command at a time and returns its `return` value. Asynchronous
//! events are skipped. Used for hotplug (`device_add`/`device_del`), `system_reset` and `quit`.

use std::io::{self, BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::qtest::{lock, send_all};

/// Why a QMP command did not return a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    /// QEMU executed the command and answered with an error.
    #[error("QMP command `{command}` failed: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The socket could not be reached, broke, or QEMU did not answer in time.
    #[error("QMP transport: {0}")]
    Transport(String),
    /// QEMU sent something that is not a QMP message.
    #[error("QMP protocol: {0}")]
    Protocol(String),
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

/// A QMP client for one QEMU.
pub(crate) struct QmpClient {
    path: PathBuf,
    conn: Mutex<Option<Conn>>,
}

impl QmpClient {
    pub(crate) fn new(path: PathBuf) -> QmpClient {
        QmpClient {
            path,
            conn: Mutex::new(None),
        }
    }

    /// Executes `command` with `arguments` (`Value::Null` for none) and returns its `return`
    /// value. Gives up after `timeout` (a broken or timed-out connection is dropped and the
    /// next call connects again).
    pub(crate) fn execute(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut guard = lock(&self.conn);
        if guard.is_none() {
            *guard = Some(self.connect(deadline)?);
        }
        let Some(conn) = guard.as_mut() else {
            return Err(QmpError::Transport("no connection".into()));
        };
        let result = conn.execute(command, arguments, deadline);
        if matches!(
            result,
            Err(QmpError::Transport(_)) | Err(QmpError::Protocol(_))
        ) {
            *guard = None;
        }
        result
    }

    /// Drops the connection (the next call reconnects).
    pub(crate) fn disconnect(&self) {
        *lock(&self.conn) = None;
    }

    fn connect(&self, deadline: Instant) -> Result<Conn, QmpError> {
        // QEMU creates the socket early during start-up, but retry briefly in case it is not
        // listening yet.
        let stream = loop {
            match UnixStream::connect(&self.path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(QmpError::Transport(format!(
                        "connecting to {}: {e}",
                        self.path.display()
                    )));
                }
            }
        };
        let writer = stream
            .try_clone()
            .map_err(|e| QmpError::Transport(format!("cloning the QMP socket: {e}")))?;
        let mut conn = Conn {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        };
        let greeting = conn.read_message(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        conn.execute("qmp_capabilities", Value::Null, deadline)?;
        Ok(conn)
    }
}

impl Conn {
    fn read_message(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Transport("timed out waiting for QEMU".into()));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(deadline - now))
                .map_err(|e| QmpError::Transport(format!("setting a read timeout: {e}")))?;
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(QmpError::Transport("QEMU closed the QMP socket".into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Transport("timed out waiting for QEMU".into()));
                }
                Err(e) => return Err(QmpError::Transport(format!("reading: {e}"))),
            }
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            return serde_json::from_str(text)
                .map_err(|e| QmpError::Protocol(format!("not JSON ({e}): {text}")));
        }
    }

    fn execute(
        &mut self,
        command: &str,
        arguments: Value,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        send_all(&self.writer, text.as_bytes())
            .map_err(|e| QmpError::Transport(format!("writing: {e}")))?;
        loop {
            let reply = self.read_message(deadline)?;
            if reply.get("event").is_some() {
                log::debug!("QMP event: {reply}");
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                log::warn!("skipping QMP reply for another command: {reply}");
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("(none)")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "reply without return or error: {reply}"
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    #[test]
    fn fake_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["execute"], "qmp_capabilities");
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", v["id"]).as_bytes())
                .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["execute"], "query-status");
            assert!(v.get("arguments").is_none());
            w.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\r\n")
                .unwrap();
            w.write_all(
                format!(
                    "{{\"return\": {{\"status\": \"running\"}}, \"id\": {}}}\r\n",
                    v["id"]
                )
                .as_bytes(),
            )
            .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["arguments"]["id"], "nope");
            w.write_all(
                format!(
                    "{{\"error\": {{\"class\": \"DeviceNotFound\", \"desc\": \"no such device\"}}, \"id\": {}}}\r\n",
                    v["id"]
                )
                .as_bytes(),
            )
            .unwrap();
        });
        let client = QmpClient::new(path);
        let t = Duration::from_secs(5);
        let r = client.execute("query-status", Value::Null, t).unwrap();
        assert_eq!(r["status"], "running");
        let e = client
            .execute("device_del", json!({"id": "nope"}), t)
            .unwrap_err();
        assert_eq!(
            e,
            QmpError::Command {
                command: "device_del".into(),
                class: "DeviceNotFound".into(),
                desc: "no such device".into()
            }
        );
        server.join().unwrap();
        // The server is gone: a transport error, not a hang.
        let e = client.execute("query-status", Value::Null, t).unwrap_err();
        assert!(matches!(e, QmpError::Transport(_)), "{e}");
    }
}
