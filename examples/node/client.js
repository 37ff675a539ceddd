// valuerank from Node: load the .proto at run time, then Recommend, Score and ReportOutcomes.
//
//   npm install
//   node client.js 127.0.0.1:50051 [path/to/protos]
//
// Prints one JSON object with the three answers (the test in tests/test_node_client.py reads it).
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const target = process.argv[2] || "127.0.0.1:50051";
const protoRoot = process.argv[3] || path.join(__dirname, "..", "..");

const definition = protoLoader.loadSync("protos/valuerank/v1/recommender.proto", {
  includeDirs: [protoRoot],
  keepCase: true, // field names as in the .proto: request_id, user_id, ...
  longs: Number, // int64 ids as numbers (item ids fit in 2^53)
  enums: String,
  defaults: true,
});
const valuerank = grpc.loadPackageDefinition(definition).valuerank.v1;
const client = new valuerank.Recommender(target, grpc.credentials.createInsecure());

function call(method, request) {
  const deadline = new Date(Date.now() + 10000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  const requestId = `node-${process.pid}-${Date.now()}`;
  const recommended = await call("Recommend", {
    request_id: requestId,
    user_id: 3,
    surface: "ecommerce_recommendation",
    k: 5,
  });
  const itemIds = recommended.items.map((item) => item.item_id);
  const scored = await call("Score", { user_id: 3, surface: "ecommerce_recommendation", item_ids: itemIds });
  const first = itemIds[0];
  const reported = await call("ReportOutcomes", {
    outcomes: [
      { request_id: requestId, item_id: first, event: "EVENT_CLICK" },
      { request_id: requestId, item_id: first, event: "EVENT_CONVERSION", revenue: 12.5 },
    ],
  });
  let invalid = null;
  try {
    await call("Recommend", { user_id: 3, surface: "ecommerce_recommendation", k: 0 });
  } catch (err) {
    invalid = { code: err.code, details: err.details };
  }
  console.log(JSON.stringify({ recommended, scored, reported, invalid }));
  client.close();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
