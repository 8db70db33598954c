#!/usr/bin/env node
// Serves HashiCorp's Consul API double (@hashicorp/consul-api-double) with @hashicorp/api-double, for
// tests/servers/consul_npm.py. The same middleware chain as api-double's own bin/index.js (headers,
// cookie-parser, body-parser text, the controller), with two differences the tests need: it listens on
// 127.0.0.1 only (the bin listens on every interface) and on port 0 unless --port is given, and it prints
// one machine-readable ready line with the port the kernel chose.
//
// Usage: node serve.js [--port N] [--seed N] [--dir DIR]
// Environment: CONSUL_* variables are the templates' knobs (CONSUL_NODE_COUNT, CONSUL_CHECK_COUNT, ...);
// api-double reads them through its env() helper, after cookies of the same (upper-case) name.
'use strict';
const fs = require('fs');
const path = require('path');
const { promisify } = require('util');

const args = { port: 0, seed: undefined, dir: undefined };
for (let i = 2; i < process.argv.length; i += 2) {
  const flag = process.argv[i];
  const value = process.argv[i + 1];
  if (value === undefined || !['--port', '--seed', '--dir'].includes(flag)) {
    console.error(`serve.js: expected --port N, --seed N or --dir DIR, got ${JSON.stringify(flag)}`);
    process.exit(2);
  }
  args[flag.slice(2)] = value;
}
const dir = path.resolve(
  args.dir || path.dirname(require.resolve('@hashicorp/consul-api-double/package.json'))
);
const controller = require('@hashicorp/api-double')(
  args.seed, dir, promisify(fs.readFile), process.env, path.resolve
);
const express = require('express');
const app = express();
app.use(require('@hashicorp/api-double/lib/headers')());
app.use(require('cookie-parser')());
app.use(require('body-parser').text({ type: '*/*' }));
app.use(controller().serve);
const server = app.listen(Number(args.port), '127.0.0.1', () => {
  const { address, port } = server.address();
  console.log(`READY ${address} ${port}`);
});
server.on('error', (err) => {
  console.error(`serve.js: cannot listen: ${err.message}`);
  process.exit(1);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
