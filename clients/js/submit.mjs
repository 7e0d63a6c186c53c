#!/usr/bin/env node
// chainyard example client in JavaScript: submit a chain and wait for its result.
//
// It uses only what chainyard publishes for other languages: the JSON Schema files in
// contracts/schema/ and the subjects (docs/CONTRACTS.md, contracts/asyncapi.yaml).
//
//   node clients/js/submit.mjs --nats nats://127.0.0.1:4222 --tenant acme chain.json
//
// 1. validate the chain against contracts/schema/chain.json (JSON Schema draft 2020-12), so a
//    malformed chain fails here, before anything is sent, with the same JSON paths the
//    router's `chain.rejected` event uses ($.steps[0].model);
// 2. subscribe to cy.events.<tenant>.<chain>.> first, so no event can be missed;
// 3. publish the chain to cy.submit.<tenant> through JetStream (the stream acks it, with the
//    message's sequence) and `traceparent` if given; no `Nats-Msg-Id`: the router takes a chain
//    id once per tenant (the same chain again runs once, another chain under it is rejected);
// 4. wait for the end that answers this submission and print it as one line of JSON: a
//    chain.rejected whose `intake_seq` is the ack's sequence, or a chain.completed /
//    chain.failed / chain.cancelled whose `digest` is the SHA-256 (first 32 hex digits) of the
//    bytes sent, trimmed of leading and trailing whitespace. An end that came before (the same chain submitted earlier) is read from the
//    event log by a direct get; the end of another chain under the same id is not an answer.
//
// Exit status: 0 chain.completed; 1 chain.failed, chain.cancelled or chain.rejected;
// 2 bad usage or a chain that is not valid JSON / fails the schema (nothing was sent);
// 3 no terminal event within --timeout (the chain may still be running); 4 NATS errors.

import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { createHash, randomBytes } from "node:crypto";

import Ajv2020 from "ajv/dist/2020.js";
import { connect, credsAuthenticator, headers, StringCodec } from "nats";

const HERE = dirname(fileURLToPath(import.meta.url));
const DEFAULT_SCHEMA = resolve(HERE, "../../contracts/schema/chain.json");
const ENDS = ["chain.completed", "chain.failed", "chain.cancelled"];
const ID = /^[A-Za-z0-9_-]{1,64}$/;
const TRACEPARENT = /^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/;

const USAGE = `usage: node submit.mjs [--nats URL] [--tenant T] [--creds FILE] [--prefix cy]
                     [--timeout SECONDS] [--traceparent TP] [--schema chain.json] FILE|-

  --nats         NATS URL, credentials may be in it (default $CHAINYARD_NATS or nats://127.0.0.1:4222)
  --tenant       tenant, the subject token (default $CHAINYARD_TENANT or "default")
  --creds        NATS credentials file
  --prefix       subject prefix (default "cy")
  --timeout      seconds to wait for the chain's end (default 300)
  --traceparent  W3C trace context header to send with the chain (00-<trace>-<span>-<flags>)
  --schema       the chain JSON Schema (default: contracts/schema/chain.json of this checkout)

A chain without "id" gets a fresh one. Exit 0 only when the chain completed.`;

class UsageError extends Error {}

function options(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      nats: { type: "string", default: process.env.CHAINYARD_NATS || "nats://127.0.0.1:4222" },
      tenant: { type: "string", default: process.env.CHAINYARD_TENANT || "default" },
      creds: { type: "string" },
      prefix: { type: "string", default: "cy" },
      timeout: { type: "string", default: "300" },
      traceparent: { type: "string" },
      schema: { type: "string", default: DEFAULT_SCHEMA },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (positionals.length !== 1) throw new UsageError("exactly one chain file (or -) is needed");
  if (!ID.test(values.tenant)) throw new UsageError(`--tenant must match ${ID}`);
  if (!/^[A-Za-z0-9_-]+$/.test(values.prefix)) throw new UsageError("--prefix must be one subject token");
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) throw new UsageError("--timeout must be a positive number of seconds");
  if (values.traceparent !== undefined && !TRACEPARENT.test(values.traceparent)) {
    throw new UsageError("--traceparent must be a W3C traceparent: 00-<32 hex>-<16 hex>-<2 hex>");
  }
  return { ...values, timeout, file: positionals[0] };
}

// Same shape as chainyard's own ids: time-ordered, subject-safe.
function newId() {
  return Date.now().toString(16).padStart(12, "0") + randomBytes(7).toString("hex");
}

// "/steps/0/model" -> "$.steps[0].model": the path style of the router's FieldError.
function jsonPath(pointer) {
  let out = "$";
  for (const raw of pointer.split("/").slice(1)) {
    const token = raw.replaceAll("~1", "/").replaceAll("~0", "~");
    out += /^\d+$/.test(token) ? `[${token}]` : /^[A-Za-z_][A-Za-z0-9_]*$/.test(token) ? `.${token}` : `[${JSON.stringify(token)}]`;
  }
  return out;
}

const STEP_DEFS = { llm: "LlmStep", tool: "ToolStep", wait: "WaitStep" };

function fieldError(e, prefix = "") {
  let path = jsonPath(prefix + e.instancePath);
  let message = e.message ?? e.keyword;
  if (e.keyword === "additionalProperties") {
    path += `.${e.params.additionalProperty}`;
    message = "unknown field";
  } else if (e.keyword === "required") {
    path += `.${e.params.missingProperty}`;
    message = "required field is missing";
  } else if (e.keyword === "enum") {
    message += `: ${e.params.allowedValues.map((v) => JSON.stringify(v)).join(", ")}`;
  }
  return { path, message };
}

// The whole-chain validator decides; the messages come from a second look. Ajv reports every
// branch of the step union (anyOf llm | tool | wait), which reads badly, so each step is
// checked again against the branch its "kind" names, from the same schema file.
function explain(validator, chain) {
  const out = [];
  const seen = new Set();
  const add = ({ path, message }) => {
    const key = `${path}: ${message}`;
    if (!seen.has(key)) {
      seen.add(key);
      out.push({ path, message });
    }
  };
  for (const e of validator.validate.errors) {
    if (!/^\/steps\/\d+(\/|$)/.test(e.instancePath)) add(fieldError(e));
  }
  (Array.isArray(chain.steps) ? chain.steps : []).forEach((step, i) => {
    const def = step && typeof step === "object" && !Array.isArray(step) ? STEP_DEFS[step.kind] : undefined;
    if (!def) {
      add({ path: `$.steps[${i}].kind`, message: `must be one of ${Object.keys(STEP_DEFS).map((k) => JSON.stringify(k)).join(", ")}` });
      return;
    }
    const check = validator.step(def);
    if (!check(step)) for (const e of check.errors) add(fieldError(e, `/steps/${i}`));
  });
  if (out.length === 0) for (const e of validator.validate.errors) add(fieldError(e));
  return out;
}

function loadValidator(schemaPath) {
  const schema = JSON.parse(readFileSync(schemaPath, "utf8"));
  const ajv = new Ajv2020({ allErrors: true, strict: true });
  // msgspec marks the step union with an OpenAPI-style `discriminator` annotation; Ajv's own
  // discriminator support needs `oneOf`, so it is declared here as an annotation only.
  ajv.addKeyword({ keyword: "discriminator", schemaType: "object" });
  const validate = ajv.compile(schema);
  return { validate, step: (def) => ajv.getSchema(`${schema.$id}#/$defs/${def}`) };
}

function readChain(file) {
  const text = readFileSync(file === "-" ? 0 : file, "utf8");
  try {
    return { chain: JSON.parse(text), text };
  } catch (e) {
    return { error: `$: not JSON: ${e.message}` };
  }
}

async function main() {
  let opts;
  try {
    opts = options(process.argv.slice(2));
  } catch (e) {
    console.error(`${e.message}\n\n${USAGE}`);
    return 2;
  }

  const { chain, text, error } = readChain(opts.file);
  if (error) {
    console.error(`invalid: ${error}`);
    console.error("invalid: the chain was not sent");
    return 2;
  }
  let named = false; // an id added here: the chain is sent re-encoded
  if (chain && typeof chain === "object" && !Array.isArray(chain) && chain.id === undefined) {
    chain.id = `js-${newId()}`;
    named = true;
  }
  const validator = loadValidator(opts.schema);
  if (!validator.validate(chain)) {
    for (const err of explain(validator, chain)) console.error(`invalid: ${err.path}: ${err.message}`);
    console.error("invalid: the chain was not sent");
    return 2;
  }

  const p = opts.prefix;
  const eventsSubject = `${p}.events.${opts.tenant}.${chain.id}.>`;
  const submitSubject = `${p}.submit.${opts.tenant}`;
  const nc = await connect({
    servers: opts.nats,
    name: `chainyard-js-${opts.tenant}`,
    ...(opts.creds ? { authenticator: credsAuthenticator(readFileSync(opts.creds)) } : {}),
  });
  const sc = StringCodec();
  try {
    // The bytes as given: a chain is the same chain for every client (the router compares
    // digests of the submitted bytes), so the file sent by `chainyard submit` gets its answer.
    const data = sc.encode(named ? JSON.stringify(chain) : text);
    // (trimmed of ASCII whitespace, as the router does: a last newline is not another chain)
    const trimmed = sc.decode(data).replace(/^[ \t\n\r\v\f]+|[ \t\n\r\v\f]+$/g, "");
    const digest = createHash("sha256").update(trimmed).digest("hex").slice(0, 32);
    let seq; // the intake sequence, once the publish is acknowledged
    const early = []; // rejections seen before the ack
    let answer;
    const answered = new Promise((res) => (answer = res));
    const offer = (ev) => {
      if (ev.type === "chain.rejected") {
        if (seq === undefined) early.push(ev);
        else if (!ev.intake_seq || ev.intake_seq === seq) answer(ev);
      } else if (ENDS.includes(ev.type) && (!ev.digest || ev.digest === digest)) {
        answer(ev); // unknown types are "not for me" (schema rule 3)
      }
    };
    // Subscribe before publishing: the chain's events cannot outrun us.
    const sub = nc.subscribe(eventsSubject, {
      callback: (err, m) => {
        if (err) return;
        try {
          offer(JSON.parse(sc.decode(m.data)));
        } catch {
          // not ours to judge; the router only sends JSON
        }
      },
    });
    await nc.flush();

    const h = headers();
    if (opts.traceparent) h.set("traceparent", opts.traceparent);
    const ack = await nc.jetstream().publish(submitSubject, data, { headers: h });
    console.error(`submitted ${chain.id} to ${submitSubject} (stream ${ack.stream} seq ${ack.seq})`);
    seq = ack.seq;
    early.forEach(offer);
    // Submitted before and already ended: its end will not come again, it is in the event log.
    const jsm = await nc.jetstreamManager({ checkAPI: false });
    const events = `${p.toUpperCase()}_EVENTS`;
    for (const kind of ENDS) {
      try {
        const m = await jsm.direct.getMessage(events, { last_by_subj: `${p}.events.${opts.tenant}.${chain.id}.${kind}` });
        const ev = m.json();
        if (ev.digest && ev.digest !== digest) {
          console.error(`chain id ${chain.id} was used by another chain; waiting for the router's answer`);
        }
        offer(ev);
      } catch {
        // none yet (or no rights to read the log): the live subscription answers
      }
    }

    let timer;
    const timedOut = new Promise((res) => {
      timer = setTimeout(() => res(null), opts.timeout * 1000);
    });
    const ev = await Promise.race([answered, timedOut]);
    clearTimeout(timer);
    sub.unsubscribe();
    if (!ev) {
      console.error(`chain ${JSON.stringify(chain.id)} did not end within ${opts.timeout} s`);
      return 3;
    }
    process.stdout.write(JSON.stringify(ev) + "\n");
    if (ev.type === "chain.rejected") {
      for (const err of ev.errors ?? []) console.error(`rejected: ${err.path}: ${err.message}`);
    } else if (ev.type === "chain.failed" || ev.type === "chain.cancelled") {
      console.error(`${ev.type.slice(6)}: ${ev.reason}`);
    }
    return ev.type === "chain.completed" ? 0 : 1;
  } finally {
    await nc.drain();
  }
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(`error: ${e?.message ?? e}`);
    process.exit(4);
  },
);
