// Start the Durable Streams reference server (@durable-streams/server) for
// bench/w1_http.sh, and print "listening on <url>" once it accepts requests.
//
//   node bench/w1_ref_server.mjs [--data-dir DIR]     # file-backed with DIR, else in memory
//
// The package is not a dependency of bench/: it is loaded from DS_NODE_MODULES
// (default: conformance/node_modules in this repo, where conformance/package.json
// pins @durable-streams/server 0.3.7).  SIGTERM/SIGINT stop it cleanly.
import { createRequire } from "node:module"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const here = dirname(fileURLToPath(import.meta.url))
const modules = process.env.DS_NODE_MODULES || join(here, "..", "conformance", "node_modules")
const require = createRequire(join(modules, "noop.js"))
const { DurableStreamTestServer } = require("@durable-streams/server")
const version = require("@durable-streams/server/package.json").version

const args = process.argv.slice(2)
const i = args.indexOf("--data-dir")
const dataDir = i >= 0 ? args[i + 1] : undefined

const server = new DurableStreamTestServer({ port: 0, host: "127.0.0.1", dataDir })
const url = await server.start()
console.error(`listening on ${url} (@durable-streams/server ${version}, ` +
  `${dataDir ? `file-backed in ${dataDir}` : "in memory"})`)

let stopping = false
const stop = async () => {
  if (stopping) return
  stopping = true
  await server.stop()
  process.exit(0)
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
