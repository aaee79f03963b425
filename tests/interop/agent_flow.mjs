// An Ops-Core agent and operator written in Node.js, talking to the server through
// @grpc/grpc-js with the contract loaded straight from protos/ by @grpc/proto-loader.
//
// Usage: node agent_flow.mjs HOST:PORT
//
// Registers an agent, watches its state, stores and runs the sample workflow
// (examples/sample_workflow.json) with this process serving the tasks, follows the
// session to its end and checks the result. Prints one JSON summary line on stdout
// and exits 0; on any failure prints "agent_flow: FAILED: ..." on stderr and exits 1.

import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { isDeepStrictEqual } from "node:util";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = dirname(fileURLToPath(import.meta.url));
const REPO_ROOT = resolve(HERE, "..", "..");
const PROTO_DIR = resolve(REPO_ROOT, "protos");
const SAMPLE_WORKFLOW = resolve(REPO_ROOT, "examples", "sample_workflow.json");
const GLOBAL_TIMEOUT_MS = 20_000;
const CALL_TIMEOUT_MS = 5_000;
const CAPABILITIES = ["test_capability", "another_capability"];
const PKG = "opspawn.opscore.v1";

let currentStep = "starting";

/** Stops the process with a clear message; never returns. */
function fail(message) {
  process.stderr.write(`agent_flow: FAILED at "${currentStep}": ${message}\n`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) fail(message);
}

function step(name) {
  currentStep = name;
}

function describeError(err) {
  if (err && typeof err.code === "number") {
    return `${grpc.status[err.code] ?? err.code}: ${err.details ?? err.message}`;
  }
  return err instanceof Error ? err.stack ?? err.message : String(err);
}

const address = process.argv[2];
if (!address) {
  process.stderr.write("usage: node agent_flow.mjs HOST:PORT\n");
  process.exit(2);
}
setTimeout(() => fail(`global timeout of ${GLOBAL_TIMEOUT_MS / 1000}s exceeded`), GLOBAL_TIMEOUT_MS);
process.on("unhandledRejection", (err) => fail(describeError(err)));
process.on("uncaughtException", (err) => fail(describeError(err)));

// --------------------------------------------------------------------------- contract

// keepCase: field names as in the .proto files (snake_case), like grpcurl and Python.
const packageDefinition = protoLoader.loadSync(
  [
    "opspawn/opscore/v1/lifecycle.proto",
    "opspawn/opscore/v1/workflow.proto",
    "opspawn/opscore/v1/session.proto",
  ],
  { includeDirs: [PROTO_DIR], keepCase: true, longs: String, enums: String, oneofs: true },
);
const api = grpc.loadPackageDefinition(packageDefinition).opspawn.opscore.v1;

// google.protobuf.Struct is a message like any other to grpc-js: convert by hand.
// protobufjs supplies the well-known types from its own bundled definitions, whose
// field names stay camelCase (nullValue, structValue, ...) even with keepCase: true.
function toValue(value) {
  if (value === null || value === undefined) return { nullValue: "NULL_VALUE" };
  if (typeof value === "number") return { numberValue: value };
  if (typeof value === "string") return { stringValue: value };
  if (typeof value === "boolean") return { boolValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  return { structValue: toStruct(value) };
}

function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) };
}

function fromValue(value) {
  switch (value.kind) {
    case "nullValue":
      return null;
    case "numberValue":
    case "stringValue":
    case "boolValue":
      return value[value.kind];
    case "listValue":
      return (value.listValue.values ?? []).map(fromValue);
    case "structValue":
      return fromStruct(value.structValue);
    default:
      fail(`unexpected google.protobuf.Value ${JSON.stringify(value)}`);
  }
}

function fromStruct(struct) {
  const fields = struct?.fields ?? {};
  return Object.fromEntries(Object.entries(fields).map(([k, v]) => [k, fromValue(v)]));
}

const snakeToCamel = (name) => name.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase());

/** The full name of a field's message type, resolved like protoc does from `scope`. */
function resolveType(scope, typeName) {
  if (typeName.startsWith(".")) return typeName.slice(1);
  const parts = scope.split(".");
  for (let n = parts.length; n >= 0; n--) {
    const candidate = [...parts.slice(0, n), typeName].join(".");
    if (packageDefinition[candidate]) return candidate;
  }
  return typeName;
}

/**
 * Converts proto3 JSON (camelCase or original field names, Struct as plain JSON,
 * Duration as "60s") into the snake_case object grpc-js serializes, guided by the
 * message descriptor. Unknown fields are an error, as in any proto3 JSON parser.
 */
function fromProtoJson(typeName, json, path = typeName) {
  if (typeName === "google.protobuf.Struct") return toStruct(json);
  if (typeName === "google.protobuf.Value") return toValue(json);
  if (typeName === "google.protobuf.Duration") {
    const match = /^(\d+)(?:\.(\d{1,9}))?s$/.exec(String(json));
    check(match, `${path}: bad duration ${JSON.stringify(json)}`);
    return { seconds: match[1], nanos: Number((match[2] ?? "").padEnd(9, "0")) };
  }
  const entry = packageDefinition[typeName];
  check(entry?.type?.field, `${path}: unknown message type ${typeName}`);
  const out = {};
  for (const [key, value] of Object.entries(json)) {
    const field = entry.type.field.find((f) => f.name === key || snakeToCamel(f.name) === key);
    check(field, `${path}: no field "${key}" in ${typeName}`);
    if (value === null) continue; // proto3 JSON: null means the default value
    const convert = (item, where) =>
      field.type === "TYPE_MESSAGE"
        ? fromProtoJson(resolveType(typeName, field.typeName), item, where)
        : item;
    out[field.name] =
      field.label === "LABEL_REPEATED"
        ? value.map((item, i) => convert(item, `${path}.${field.name}[${i}]`))
        : convert(value, `${path}.${field.name}`);
  }
  return out;
}

// --------------------------------------------------------------------------- calls

const credentials = grpc.credentials.createInsecure();
const lifecycle = new api.LifecycleService(address, credentials);
const workflows = new api.WorkflowService(address, credentials);
const sessions = new api.SessionService(address, credentials);

/** Calls a unary method; resolves with the response, rejects with the ServiceError. */
function unary(client, method, request) {
  return new Promise((resolvePromise, reject) => {
    const deadline = new Date(Date.now() + CALL_TIMEOUT_MS);
    client[method](request, { deadline }, (err, response) =>
      err ? reject(err) : resolvePromise(response),
    );
  });
}

/** Like unary, but any error ends the run with the method name in the message. */
async function call(client, method, request) {
  try {
    return await unary(client, method, request);
  } catch (err) {
    fail(`${method} failed: ${describeError(err)}`);
  }
}

/**
 * Collects the messages of a server stream and lets the caller wait for conditions
 * on what has arrived so far. A stream error other than our own cancel ends the run.
 */
class StreamReader {
  constructor(name, stream, onMessage = () => {}) {
    this.name = name;
    this.stream = stream;
    this.messages = [];
    this.ended = false;
    this.cancelled = false;
    this.waiters = [];
    stream.on("data", (message) => {
      this.messages.push(message);
      onMessage(message);
      this.wake();
    });
    stream.on("end", () => {
      this.ended = true;
      this.wake();
    });
    stream.on("error", (err) => {
      if (this.cancelled && err.code === grpc.status.CANCELLED) return;
      fail(`${name} stream failed: ${describeError(err)}`);
    });
  }

  wake() {
    this.waiters = this.waiters.filter((waiter) => !waiter());
  }

  /** Resolves once predicate(messages) holds; fails if the stream ends first. */
  until(predicate, what) {
    return new Promise((resolvePromise) => {
      const waiter = () => {
        if (predicate(this.messages)) {
          resolvePromise(this.messages);
          return true;
        }
        if (this.ended) fail(`${this.name} stream ended before ${what}`);
        return false;
      };
      if (!waiter()) this.waiters.push(waiter);
    });
  }

  /** Resolves when the server ends the stream. */
  end() {
    return this.until(() => this.ended, "its end");
  }

  cancel() {
    this.cancelled = true;
    this.stream.cancel();
  }
}

// --------------------------------------------------------------------------- the flow

async function main() {
  const agentId = `node-agent-${process.pid}-${Date.now()}`;

  step("RegisterAgent");
  const agent = await call(lifecycle, "RegisterAgent", {
    agent_id: agentId,
    name: "Node.js interop agent",
    version: "1.0.0",
    capabilities: CAPABILITIES,
    metadata: { runtime: `node ${process.version}` },
  });
  check(agent.agent_id === agentId, `registered agent_id ${agent.agent_id}, want ${agentId}`);
  check(
    isDeepStrictEqual(agent.capabilities, CAPABILITIES),
    `capabilities ${JSON.stringify(agent.capabilities)}`,
  );
  check(agent.state === "AGENT_STATE_INITIALIZING", `new agent is ${agent.state}`);

  step("WatchAgentStates (initial state)");
  const watch = new StreamReader(
    "WatchAgentStates",
    lifecycle.WatchAgentStates({ agent_ids: [agentId], send_initial_state: true }),
  );
  const agentEvents = () => watch.messages.flatMap((response) => response.events ?? []);
  await watch.until(
    () => agentEvents().some((e) => e.type === "AGENT_EVENT_TYPE_SYNCED"),
    "the SYNCED event",
  );
  const initial = agentEvents();
  check(
    initial.length === 2 &&
      initial[0].type === "AGENT_EVENT_TYPE_SNAPSHOT" &&
      initial[0].agent?.agent_id === agentId &&
      initial[0].agent?.state === "AGENT_STATE_INITIALIZING" &&
      initial[1].type === "AGENT_EVENT_TYPE_SYNCED",
    `initial watch events: ${JSON.stringify(initial)}`,
  );
  const syncedRevision = BigInt(initial[1].revision);

  step("UpdateAgentState -> IDLE, seen by the watch");
  const details = { ready: true, client: "node" };
  const updated = await call(lifecycle, "UpdateAgentState", {
    agent_id: agentId,
    state: "AGENT_STATE_IDLE",
    details: toStruct(details),
  });
  check(updated.state === "AGENT_STATE_IDLE", `state after update: ${updated.state}`);
  await watch.until(
    () => agentEvents().some((e) => e.type === "AGENT_EVENT_TYPE_STATE_CHANGED"),
    "the STATE_CHANGED event",
  );
  const changed = agentEvents().find((e) => e.type === "AGENT_EVENT_TYPE_STATE_CHANGED");
  check(
    changed.agent?.state === "AGENT_STATE_IDLE" &&
      isDeepStrictEqual(fromStruct(changed.agent.state_details), details) &&
      BigInt(changed.revision) > syncedRevision &&
      changed.revision === updated.revision,
    `STATE_CHANGED event ${JSON.stringify(changed)} vs update revision ${updated.revision}`,
  );
  const agentEventTypes = agentEvents().map((e) => e.type);
  watch.cancel();

  step("CreateWorkflowDefinition (sample workflow)");
  const sample = JSON.parse(readFileSync(SAMPLE_WORKFLOW, "utf8"));
  const definition = fromProtoJson(`${PKG}.WorkflowDefinition`, sample);
  let definitionCreated = true;
  try {
    const stored = await unary(workflows, "CreateWorkflowDefinition", { definition });
    check(
      isDeepStrictEqual(
        stored.tasks.map((t) => [
          t.task_id,
          t.agent_capability,
          t.next_task_id ?? "",
          fromStruct(t.parameters),
        ]),
        [
          ["step_1", "test_capability", "step_2", sample.tasks[0].parameters],
          ["step_2", "another_capability", "", sample.tasks[1].parameters],
        ],
      ),
      `stored definition tasks: ${JSON.stringify(stored.tasks)}`,
    );
  } catch (err) {
    if (err.code !== grpc.status.ALREADY_EXISTS) {
      fail(`CreateWorkflowDefinition failed: ${describeError(err)}`);
    }
    definitionCreated = false;
  }

  step("StreamTasks");
  const outputs = {};
  const assignments = [];
  const completions = [];
  const tasks = new StreamReader(
    "StreamTasks",
    workflows.StreamTasks({ agent_id: agentId, max_in_flight: 1 }),
    (assignment) => {
      const payload = fromStruct(assignment.payload);
      const output = {
        task_id: assignment.task_id,
        handled_by: agentId,
        attempt: assignment.attempt,
        parameters: payload.parameters ?? null,
      };
      assignments.push({ ...assignment, payload });
      outputs[assignment.task_id] = output;
      completions.push(
        call(workflows, "CompleteTask", {
          task_token: assignment.task_token,
          output: toStruct(output),
        }),
      );
    },
  );

  step("StartWorkflow");
  const input = { client: "node", agent: agentId };
  const started = await call(workflows, "StartWorkflow", {
    workflow_definition_id: sample.id,
    input: toStruct(input),
    agent_id: agentId, // pinned: no other agent of a shared server takes these tasks
    request_id: `run-${agentId}`,
  });
  const sessionId = started.session_id;
  check(sessionId, `StartWorkflow returned no session_id: ${JSON.stringify(started)}`);

  step("WatchSession until SESSION_COMPLETED");
  const sessionWatch = new StreamReader(
    "WatchSession",
    sessions.WatchSession({ session_id: sessionId }),
  );
  await sessionWatch.end();
  const sessionEvents = sessionWatch.messages;
  const sessionEventTypes = sessionEvents.map((e) => e.type);
  check(
    sessionEventTypes.at(-1) === "SESSION_EVENT_TYPE_SESSION_COMPLETED",
    `session events: ${JSON.stringify(sessionEventTypes)}`,
  );
  check(
    sessionEvents.every((e, i) => e.session_id === sessionId && e.sequence === String(i + 1)),
    `session event sequences are not 1..n: ${sessionEvents.map((e) => e.sequence)}`,
  );
  await Promise.all(completions);
  tasks.cancel();

  step("GetSession");
  const session = await call(sessions, "GetSession", { session_id: sessionId });
  check(session.status === "SESSION_STATUS_COMPLETED", `session status ${session.status}`);
  check(
    session.tasks.every((t) => t.status === "TASK_STATUS_COMPLETED" && t.agent_id === agentId),
    `session tasks: ${JSON.stringify(session.tasks)}`,
  );
  check(
    isDeepStrictEqual(fromStruct(session.input), input),
    `session input ${JSON.stringify(fromStruct(session.input))}`,
  );
  const sessionOutput = fromStruct(session.output);
  check(
    isDeepStrictEqual(sessionOutput, { step_2: outputs.step_2 }),
    `session output ${JSON.stringify(sessionOutput)}`,
  );

  step("payloads");
  check(
    isDeepStrictEqual(
      assignments.map((a) => [a.task_id, a.session_id, a.attempt]),
      [
        ["step_1", sessionId, 1],
        ["step_2", sessionId, 1],
      ],
    ),
    `assignments: ${JSON.stringify(assignments.map((a) => [a.task_id, a.session_id]))}`,
  );
  const [first, second] = assignments;
  check(
    isDeepStrictEqual(first.payload.input, input) && isDeepStrictEqual(second.payload.input, input),
    `payload input: ${JSON.stringify([first.payload.input, second.payload.input])}`,
  );
  check(
    isDeepStrictEqual(first.payload.parameters, sample.tasks[0].parameters) &&
      isDeepStrictEqual(second.payload.parameters, sample.tasks[1].parameters),
    `payload parameters: ${JSON.stringify([first.payload.parameters, second.payload.parameters])}`,
  );
  check(
    isDeepStrictEqual(second.payload.upstream, { step_1: outputs.step_1 }),
    `step_2 payload.upstream ${JSON.stringify(second.payload.upstream)}, ` +
      `want {"step_1": ${JSON.stringify(outputs.step_1)}}`,
  );

  step("done");
  const summary = {
    ok: true,
    agent_id: agentId,
    agent_events: agentEventTypes,
    definition_created: definitionCreated,
    session_id: sessionId,
    session_status: session.status,
    session_events: sessionEventTypes,
    tasks: assignments.map((a) => ({ task_id: a.task_id, attempt: a.attempt })),
    step_2_upstream: second.payload.upstream,
    session_output: sessionOutput,
  };
  process.stdout.write(`${JSON.stringify(summary)}\n`);
  for (const client of [lifecycle, workflows, sessions]) client.close();
  process.exit(0);
}

main().catch((err) => fail(describeError(err)));
