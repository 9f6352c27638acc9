//! Support for Warren's end-to-end tests: a server on an ephemeral loopback port, in-process.

use std::net::SocketAddr;

use warren_config::Settings;
use warren_gateway::{Server, ServerHandle};

/// Starts Warren on 127.0.0.1 with an ephemeral port and default settings.
pub fn start_server() -> ServerHandle {
    start_server_with(Settings::default())
}

/// Starts Warren with `settings`, listening on 127.0.0.1 with an ephemeral port.
pub fn start_server_with(mut settings: Settings) -> ServerHandle {
    settings.listen = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    let server = Server::bind(settings).expect("bind an ephemeral loopback port");
    server.spawn()
}

/// The AMQP URL of a running test server, with the default guest user.
pub fn amqp_url(server: &ServerHandle) -> String {
    format!("amqp://guest:guest@{}/%2f", server.local_addr())
}
