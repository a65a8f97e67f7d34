//! The rows of the guarantees table: how each server runs under baton,
//! which traffic it serves, and which counts the test asserts.

use baton_tests::harness::{config_with_worker, example_config, hello_config, Binaries, TempDir};
use baton_tests::tools::{repository, require};
use std::path::PathBuf;

/// The columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    NewConnection,
    KeepAlive,
    Http2,
    WebSocket,
}

impl Traffic {
    pub const ALL: [Traffic; 4] = [
        Traffic::NewConnection,
        Traffic::KeepAlive,
        Traffic::Http2,
        Traffic::WebSocket,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Traffic::NewConnection => "new connections",
            Traffic::KeepAlive => "keep-alive",
            Traffic::Http2 => "HTTP/2",
            Traffic::WebSocket => "WebSocket",
        }
    }
}

/// What the test does with a cell's failed count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Asserted to be 0: baton guarantees it (or the row's settings do).
    Zero,
    /// Measured and written down: the server's own behaviour.
    Recorded,
}

/// A master's directory, ready to `baton run` in, and the listener that
/// serves HTTP/2 (h2c with prior knowledge).
pub struct Setup {
    pub dir: TempDir,
    pub h2_listener: &'static str,
}

/// One server with its settings.
pub struct Row {
    /// For messages.
    pub name: &'static str,
    /// The table's first column (markdown).
    pub label: &'static str,
    /// `None` when the server is not installed (after saying so; panics
    /// instead under `BATON_REQUIRE_TOOLS=1`).
    pub setup: fn() -> Option<Setup>,
    /// Per column: why the server does not serve it, or `None`.
    unsupported: [Option<&'static str>; 4],
    /// Per column.
    expect: [Expect; 4],
}

impl Row {
    pub fn unsupported(&self, t: Traffic) -> Option<&'static str> {
        self.unsupported[t as usize]
    }

    pub fn expect(&self, t: Traffic) -> Expect {
        self.expect[t as usize]
    }
}

use Expect::{Recorded, Zero};

/// In table order.
pub static ROWS: [Row; 8] = [
    Row {
        name: "hello",
        label: "SDK: `hello` (hyper, HTTP/1.1 and h2c)",
        setup: || Some(in_dir(hello_config(2))),
        unsupported: [None, None, None, Some("no WebSocket route")],
        expect: [Zero; 4],
    },
    Row {
        name: "axum-app",
        label: "SDK: `axum-app` (axum, `/ws` sessions that move at a reload)",
        setup: || {
            let app = Binaries::example("axum-app");
            Some(in_dir(example_config(&app, 2)))
        },
        unsupported: [None; 4],
        expect: [Zero; 4],
    },
    Row {
        name: "gunicorn",
        label: "gunicorn, 2 sync workers, `protocol = \"systemd\"`",
        setup: gunicorn,
        unsupported: [
            None,
            None,
            Some("HTTP/1.1 only"),
            Some("WSGI has no WebSocket"),
        ],
        expect: [Zero, Zero, Recorded, Recorded],
    },
    Row {
        name: "uvicorn",
        label: "uvicorn, `--fd {fd:http}`",
        setup: uvicorn,
        unsupported: [None, None, Some("HTTP/1.1 only"), None],
        expect: [Zero, Recorded, Recorded, Recorded],
    },
    Row {
        name: "hypercorn",
        label: "hypercorn, `--workers 0 --bind fd://{fd:http}`",
        setup: hypercorn,
        unsupported: [None; 4],
        expect: [Zero, Recorded, Recorded, Recorded],
    },
    Row {
        name: "node",
        label: "node `examples/node/server.js`, `server.close()` at SIGTERM",
        setup: || node(0),
        unsupported: NODE_UNSUPPORTED,
        expect: [Zero, Recorded, Recorded, Recorded],
    },
    Row {
        name: "node --drain-ms",
        label:
            "node `server.js --drain-ms 1000`: `Connection: close` for 1 s, then `server.close()`",
        setup: || node(1000),
        unsupported: NODE_UNSUPPORTED,
        expect: [Zero, Zero, Recorded, Recorded],
    },
    Row {
        name: "nginx",
        label: "nginx, `examples/nginx` (+ a `listen ... http2` listener)",
        setup: nginx,
        unsupported: [None, None, None, Some("proxies WebSocket, serves none")],
        expect: [Zero, Recorded, Recorded, Recorded],
    },
];

const NODE_UNSUPPORTED: [Option<&str>; 4] = [
    None,
    None,
    Some("`node:http` is HTTP/1.1"),
    Some("no WebSocket server built in"),
];

/// A new directory holding `baton.toml`.
fn in_dir(config: String) -> Setup {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("baton.toml"), config).expect("write baton.toml");
    Setup {
        dir,
        h2_listener: "http",
    }
}

fn venv_tool(name: &str) -> Option<PathBuf> {
    require(
        name,
        "python3 -m venv target/wrap-venv && target/wrap-venv/bin/pip install gunicorn uvicorn hypercorn",
    )
}

fn quoted(path: PathBuf) -> String {
    format!("{:?}", path.display().to_string())
}

fn gunicorn() -> Option<Setup> {
    let gunicorn = venv_tool("gunicorn")?;
    let dir = TempDir::new();
    // gunicorn 23+ puts a control socket in $HOME: keep it in the test's dir.
    let worker = format!(
        "command = [{}, \"--workers\", \"2\", \"app:application\"]\n\
         cwd = {}\nenv = {{ HOME = {}, PYTHONDONTWRITEBYTECODE = \"1\" }}\n\
         protocol = \"systemd\"\nready = \"notify\"\nready_timeout = \"30s\"\ndrain_timeout = \"30s\"\n",
        quoted(gunicorn),
        quoted(repository().join("examples/gunicorn")),
        quoted(dir.path().to_path_buf()),
    );
    std::fs::write(dir.path().join("baton.toml"), config_with_worker(&worker)).unwrap();
    Some(Setup {
        dir,
        h2_listener: "http",
    })
}

/// An ASGI server running `examples/uvicorn/app.py` with `args`.
fn asgi(server: PathBuf, args: &str) -> Setup {
    let worker = format!(
        "command = [{}, {args}]\n\
         cwd = {}\nenv = {{ PYTHONDONTWRITEBYTECODE = \"1\" }}\n\
         protocol = \"args\"\nready = \"delay:1s\"\nready_timeout = \"30s\"\n\
         stop_signal = \"SIGTERM\"\nreopen_signal = \"none\"\ndrain_timeout = \"30s\"\n",
        quoted(server),
        quoted(repository().join("examples/uvicorn")),
    );
    in_dir(config_with_worker(&worker))
}

fn uvicorn() -> Option<Setup> {
    let uvicorn = venv_tool("uvicorn")?;
    Some(asgi(
        uvicorn,
        "\"app:app\", \"--fd\", \"{fd:http}\", \"--no-access-log\"",
    ))
}

fn hypercorn() -> Option<Setup> {
    let hypercorn = venv_tool("hypercorn")?;
    Some(asgi(
        hypercorn,
        "\"--bind\", \"fd://{fd:http}\", \"app:app\"",
    ))
}

fn node(drain_ms: u32) -> Option<Setup> {
    let node = require("node", "apt-get install nodejs")?;
    let worker = format!(
        "command = [{}, \"server.js\", \"--fd\", \"{{fd:http}}\", \"--drain-ms\", \"{drain_ms}\"]\n\
         cwd = {}\nprotocol = \"args\"\nready = \"delay:500ms\"\nready_timeout = \"30s\"\n\
         stop_signal = \"SIGTERM\"\nreopen_signal = \"none\"\ndrain_timeout = \"30s\"\n",
        quoted(node),
        quoted(repository().join("examples/node")),
    );
    Some(in_dir(config_with_worker(&worker)))
}

/// `examples/nginx` on free ports, with a second listener `h2` that nginx
/// serves with `listen ... http2` (h2c: nginx 1.22 speaks only HTTP/2 on
/// such a port).
fn nginx() -> Option<Setup> {
    let nginx = require("nginx", "apt-get install nginx")?;
    let example = repository().join("examples/nginx");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (http, h2) = (free(), free());
    let read = |name: &str| std::fs::read_to_string(example.join(name)).unwrap();
    let dir = TempDir::new();
    let h2_server = format!(
        "http {{\n    server {{\n        listen {h2} http2;\n        location / {{\n            return 200 \"hello from nginx $pid over HTTP/2\\n\";\n        }}\n    }}\n"
    );
    let conf = read("nginx.conf")
        .replace("127.0.0.1:8081", &http.to_string())
        .replacen("http {\n", &h2_server, 1);
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let config = read("baton.toml")
        .replace("127.0.0.1:8081", &http.to_string())
        .replace(
            "[\"nginx\",",
            &format!("[{:?},", nginx.display().to_string()),
        )
        .replace(
            "[worker]\n",
            &format!("[[listener]]\nname = \"h2\"\naddress = \"{h2}\"\n\n[worker]\n"),
        )
        .replace(
            "env = { NGINX = \"{fd:http};\" }",
            "env = { NGINX = \"{fd:http};{fd:h2};\" }",
        )
        .replace("delay:1s", "delay:600ms")
        .replace("[supervisor]\n", "[supervisor]\nlog_format = \"json\"\n");
    assert!(
        config.contains("{fd:h2}"),
        "examples/nginx/baton.toml changed: {config}"
    );
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    Some(Setup {
        dir,
        h2_listener: "h2",
    })
}

/// `docs/guarantees.md` around the generated table.
pub const DOCUMENT: &str = include_str!("template.md");
