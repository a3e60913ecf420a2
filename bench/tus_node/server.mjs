// @tus/server + @tus/file-store behind a plain node:http server: the reference for bench/compare.py.
//
//     node server.mjs PORT DIR
//
// Listens on 127.0.0.1:PORT only, serves tus 1.0.0 at /files/ and stores uploads in DIR (the file
// store's defaults: no fsync, metadata in a JSON file beside each upload). bench/compare.py copies
// this file next to the installed node_modules (~/.cache/resumable-uploads/bench-tus-node/) and runs it.
import http from "node:http";

import { FileStore } from "@tus/file-store";
import { Server } from "@tus/server";

const [port, directory] = process.argv.slice(2);
if (!port || !directory) {
  console.error("usage: node server.mjs PORT DIR");
  process.exit(2);
}

const tus = new Server({ path: "/files", datastore: new FileStore({ directory }) });

const server = http.createServer((req, res) => {
  if (req.url === "/files" || req.url.startsWith("/files/")) {
    tus.handle(req, res);
    return;
  }
  res.writeHead(404, { "Content-Length": "0" });
  res.end();
});
server.requestTimeout = 600_000; // one 1 GiB PATCH must fit (Node's default is 300 s)
server.listen(Number(port), "127.0.0.1", () => console.log(`tus-node listening on 127.0.0.1:${port}`));

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
