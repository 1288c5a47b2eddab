import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import {
  answerConfiguration,
  buildWireConfig,
  enabledSettingTarget,
  resolveServerLaunch,
  statusBarView,
  trackProgress,
  type ActiveProgress,
  wireSettingKeys,
} from "../settings";

// out/test/settings.test.js -> clients/vscode/package.json
const packageJson = JSON.parse(readFileSync(join(__dirname, "..", "..", "package.json"), "utf8"));
const properties: Record<string, { default: unknown }> =
  packageJson.contributes.configuration.properties;

/** What VS Code's getConfiguration("exlsp").get(key) returns: user value or default. */
function reader(userValues: Record<string, unknown> = {}) {
  return (key: string): unknown =>
    key in userValues ? userValues[key] : properties[`exlsp.${key}`]?.default;
}

test("wire keys are the server's sections, never the client-only ones", () => {
  const keys = wireSettingKeys(packageJson);
  assert.ok(keys.includes("model.path"));
  assert.ok(keys.includes("completion.maxTokens"));
  assert.ok(keys.includes("logging.level"));
  for (const key of keys) {
    assert.ok(!key.startsWith("server."), key);
    assert.ok(!key.startsWith("trace."), key);
    assert.equal(key.split(".").length, 2, key);
  }
  const declared = Object.keys(properties).filter(
    (name) => !name.startsWith("exlsp.server.") && !name.startsWith("exlsp.trace."),
  );
  assert.equal(keys.length, declared.length);
});

test("defaults map to the full nested tree", () => {
  const tree = buildWireConfig(wireSettingKeys(packageJson), reader());
  assert.deepEqual(Object.keys(tree).sort(), [
    "codeActions",
    "completion",
    "hover",
    "index",
    "logging",
    "model",
  ]);
  assert.equal(tree.model.path, "");
  assert.equal(tree.model.backend, "transformers");
  assert.equal(tree.model.maxSeqLen, 8192);
  assert.equal(tree.completion.enabled, true);
  assert.equal(tree.completion.maxTokens, 128);
  assert.equal(tree.completion.multiline, "auto");
  assert.equal(tree.logging.level, "info");
  assert.equal(tree.hover.deadlineMs, 2000);
  assert.equal(tree.index.maxFileBytes, 1000000);
  // Every declared setting of a section, and nothing else, lands in it.
  const declaredIn = (section: string): number =>
    Object.keys(properties).filter((name) => name.startsWith(`exlsp.${section}.`)).length;
  for (const section of Object.keys(tree)) {
    assert.equal(Object.keys(tree[section]).length, declaredIn(section), section);
  }
  assert.ok(Object.keys(tree.completion).length >= 15);
  assert.ok(Object.keys(tree.model).length >= 10);
});

test("user values land under their section, camelCase kept", () => {
  const tree = buildWireConfig(
    wireSettingKeys(packageJson),
    reader({ "model.path": "/models/qwen", "completion.maxTokensSingleLine": 7, "completion.kvReuse": false }),
  );
  assert.equal(tree.model.path, "/models/qwen");
  assert.equal(tree.completion.maxTokensSingleLine, 7);
  assert.equal(tree.completion.kvReuse, false);
  assert.equal(tree.completion.maxTokens, 128);
});

test("unknown settings are left out rather than sent as undefined", () => {
  const tree = buildWireConfig(["model.path", "model.gone"], (key) =>
    key === "model.path" ? "/m" : undefined,
  );
  assert.deepEqual(tree, { model: { path: "/m" } });
  assert.deepEqual(wireSettingKeys({}), []);
});

test("server launch: command, python, or exlsp on PATH", () => {
  assert.deepEqual(resolveServerLaunch({}), { command: "exlsp", args: ["serve"] });
  assert.deepEqual(resolveServerLaunch({ command: "", python: "", args: [] }), {
    command: "exlsp",
    args: ["serve"],
  });
  assert.deepEqual(resolveServerLaunch({ python: "/venv/bin/python" }), {
    command: "/venv/bin/python",
    args: ["-m", "exlsp.server", "serve"],
  });
  assert.deepEqual(resolveServerLaunch({ python: "/venv/bin/python", args: ["--log-level", "debug"] }), {
    command: "/venv/bin/python",
    args: ["-m", "exlsp.server", "--log-level", "debug", "serve"],
  });
  assert.deepEqual(resolveServerLaunch({ command: "/opt/exlsp", python: "/ignored" }), {
    command: "/opt/exlsp",
    args: ["serve"],
  });
  assert.deepEqual(resolveServerLaunch({ command: " ssh ", args: ["gpu-box", "exlsp", "serve"] }), {
    command: "ssh",
    args: ["gpu-box", "exlsp", "serve"],
  });
  assert.deepEqual(resolveServerLaunch({ args: ["--log-file", "/tmp/x"] }), {
    command: "exlsp",
    args: ["--log-file", "/tmp/x", "serve"],
  });
});

test("workspace/configuration answers the mapped tree for exlsp", () => {
  const tree = { model: { path: "/m" }, completion: { maxTokens: 9 } };
  const answers = answerConfiguration(
    [
      { section: "exlsp" },
      { section: "exlsp.completion" },
      { section: "exlsp.completion.maxTokens" },
      { section: "exlsp.server" },
      { section: "python" },
      {},
    ],
    () => tree,
    ["raw", "raw", "raw", "raw-server", { x: 1 }, null],
  );
  assert.deepEqual(answers, [tree, { maxTokens: 9 }, 9, "raw-server", { x: 1 }, null]);
});

test("workspace/configuration passes the scope through", () => {
  const seen: (string | undefined)[] = [];
  answerConfiguration([{ section: "exlsp", scopeUri: "file:///a.py" }, { section: "exlsp" }], (s) => {
    seen.push(s);
    return {};
  }, [null, null]);
  assert.deepEqual(seen, ["file:///a.py", undefined]);
});

test("status bar: loading, ready with latency, error, disabled, down", () => {
  const down = statusBarView(undefined, "stopped", true);
  assert.equal(down.text, "$(circle-slash) exlsp");
  assert.match(down.tooltip, /server not running/);
  const starting = statusBarView(undefined, "starting", true);
  assert.equal(starting.text, "$(loading~spin) exlsp");
  assert.match(starting.tooltip, /starting/);
  assert.equal(statusBarView({ state: "ready" }, "starting", true).text, "$(loading~spin) exlsp");
  assert.equal(statusBarView(undefined, "running", true).text, "$(loading~spin) exlsp");
  const loading = statusBarView({ state: "loading", message: "", model: "qwen", backend: "exllamav2" }, "running", true);
  assert.equal(loading.text, "$(loading~spin) exlsp loading");
  assert.match(loading.tooltip, /Model: qwen/);
  const ready = statusBarView(
    { state: "ready", message: "", model: "qwen", backend: "exllamav2", lastLatencyMs: 41.6 },
    "running",
    true,
  );
  assert.equal(ready.text, "$(sparkle) exlsp 42 ms");
  assert.match(ready.tooltip, /model loaded/);
  assert.match(ready.tooltip, /Backend: exllamav2/);
  assert.match(ready.tooltip, /Last suggestion: 42 ms/);
  const noLatency = statusBarView({ state: "ready", lastLatencyMs: null }, "running", true);
  assert.equal(noLatency.text, "$(sparkle) exlsp");
  const error = statusBarView({ state: "error", message: "CUDA out of memory" }, "running", true);
  assert.equal(error.text, "$(error) exlsp");
  assert.match(error.tooltip, /CUDA out of memory/);
  assert.equal(statusBarView({ state: "disabled" }, "running", true).text, "$(circle-slash) exlsp off");
  assert.equal(statusBarView({ state: "ready" }, "running", false).text, "$(circle-slash) exlsp off");
});

test("progress: begin adds, report updates, end removes, per token", () => {
  const running = new Map<string, ActiveProgress>();
  trackProgress(running, "exlsp-scan-1", { kind: "begin", title: "Indexing", message: "0/6 files", percentage: 0 });
  trackProgress(running, 7, { kind: "begin", title: "Embedding chunks" });
  trackProgress(running, "exlsp-scan-1", { kind: "report", percentage: 50 });
  assert.deepEqual(running.get("exlsp-scan-1"), { title: "Indexing", message: "0/6 files", percentage: 50 });
  assert.deepEqual(running.get("7"), { title: "Embedding chunks", message: undefined, percentage: undefined });
  // A report for a token never begun is ignored.
  trackProgress(running, "unknown", { kind: "report", message: "x" });
  assert.equal(running.has("unknown"), false);
  trackProgress(running, "exlsp-scan-1", { kind: "end", message: "6 files" });
  assert.deepEqual([...running.keys()], ["7"]);
});

test("status bar: indexing progress while the model is loaded", () => {
  const ready = { state: "ready", model: "qwen", lastLatencyMs: 40 };
  const indexing = statusBarView(ready, "running", true, [
    { title: "Indexing", message: "3/6 files", percentage: 49.6 },
  ]);
  assert.equal(indexing.text, "$(sync~spin) exlsp 50%");
  assert.match(indexing.tooltip, /model loaded/);
  assert.match(indexing.tooltip, /Last suggestion: 40 ms/);
  assert.match(indexing.tooltip, /Indexing 3\/6 files \(50%\)/);
  // No percentage: the spinner alone; the most recent progress wins the text.
  const two = statusBarView(ready, "running", true, [
    { title: "Indexing", percentage: 10 },
    { title: "Embedding chunks" },
  ]);
  assert.equal(two.text, "$(sync~spin) exlsp");
  assert.match(two.tooltip, /Indexing \(10%\)\nEmbedding chunks/);
  // Done: back to the latency.
  assert.equal(statusBarView(ready, "running", true, []).text, "$(sparkle) exlsp 40 ms");
  // Loading the model and disabled completions keep their own text.
  assert.equal(
    statusBarView({ state: "loading" }, "running", true, [{ title: "Indexing" }]).text,
    "$(loading~spin) exlsp loading",
  );
  assert.equal(statusBarView(ready, "running", false, [{ title: "Indexing" }]).text, "$(circle-slash) exlsp off");
});

test("enable/disable writes the most specific scope that is set", () => {
  assert.equal(enabledSettingTarget({}), "global");
  assert.equal(enabledSettingTarget({ workspaceValue: false }), "workspace");
  assert.equal(enabledSettingTarget({ workspaceValue: false, workspaceFolderValue: true }), "workspaceFolder");
});
