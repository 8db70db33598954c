// grpc-js-xds (npm) as a third xDS client: the same stdin/stdout protocol as tests/servers/xds_grpc_client.py.
// Usage: GRPC_XDS_BOOTSTRAP_CONFIG='{...}' node xds_client.js xds:///echo
"use strict";
const readline = require("node:readline");
const grpc = require("@grpc/grpc-js");
require("@grpc/grpc-js-xds").register();

const METHOD = "/echo.Echo/Who";
const identity = (x) => x;
const client = new grpc.Client(process.argv[2], grpc.credentials.createInsecure());

function who() {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10000);
    client.makeUnaryRequest(METHOD, identity, identity, Buffer.alloc(0), { deadline, waitForReady: true },
      (error, answer) => (error ? reject(error) : resolve(answer.toString())));
  });
}

async function run(command) {
  if ("calls" in command) {
    // 20 calls in flight at a time: the same picks as one after another, in a fraction of the time.
    const counts = {};
    for (let done = 0; done < command.calls; ) {
      const batch = Math.min(20, command.calls - done);
      for (const name of await Promise.all(Array.from({ length: batch }, who))) {
        counts[name] = (counts[name] || 0) + 1;
      }
      done += batch;
    }
    return { counts };
  }
  let streak = 0;
  let calls = 0;
  while (streak < command.run && calls < command.max) {
    calls++;
    streak = (await who()) === command.until ? streak + 1 : 0;
  }
  return streak >= command.run ? { calls } : { error: `no run of ${command.run} in ${calls}` };
}

async function main() {
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    process.stdout.write(JSON.stringify(await run(JSON.parse(line))) + "\n");
  }
  client.close();
  process.exit(0);
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error) + "\n");
  process.exit(1);
});
