// A plain Node.js HTTP server for baton's node example: it serves on the
// listening socket baton passes at the fd number given as `--fd N`
// (`protocol = "args"`), says which baton generation answered, and stops
// gracefully on SIGTERM.
//
// How it stops is the one setting that matters for keep-alive clients:
//
// - by default, `server.close()` at once: Node (>= 19) then closes every
//   idle keep-alive connection, and a client whose next request is already
//   on its way over such a connection sees it closed under that request
//   (browsers and most HTTP clients retry it; a strict client fails it);
// - with `--drain-ms N`, it answers every request for N ms with
//   `Connection: close`, so that busy clients leave after a complete
//   response, and only then calls `server.close()` for the connections
//   still idle.
'use strict';

const http = require('node:http');

function option(name) {
  const at = process.argv.indexOf(name);
  return at < 0 ? undefined : process.argv[at + 1];
}

const fd = Number(option('--fd'));
const drainMs = Number(option('--drain-ms') ?? 0);
if (!Number.isInteger(fd) || fd < 0) {
  console.error('server.js: give the listening socket as --fd N');
  process.exit(2);
}
const generation = process.env.BATON_GENERATION ?? '-';
let draining = false;

const server = http.createServer((req, res) => {
  const body = `hello from node ${process.pid}, generation ${generation}\n`;
  if (draining) {
    res.setHeader('Connection', 'close');
  }
  res.setHeader('Content-Type', 'text/plain');
  res.setHeader('X-Baton-Generation', generation);
  res.end(body);
});

server.on('error', (e) => {
  console.error(`server.js: ${e.message}`);
  process.exit(1);
});

server.listen({ fd }, () => {
  console.error(`server.js: generation ${generation} listening on fd ${fd}`);
});

process.on('SIGTERM', () => {
  draining = true;
  setTimeout(() => {
    // Stops accepting, closes idle keep-alive connections, and calls back
    // once the busy ones have finished.
    server.close(() => process.exit(0));
  }, drainMs);
});
