// Drives code-server (Code-OSS in the browser) with headless Chromium:
// opens a Python file with the exlsp extension installed, types, waits for
// the ghost text, accepts it with Tab, saves, and checks the file on disk;
// then the extension's commands: the status bar menu disables completions
// (no ghost text while off), the command palette enables them again (ghost
// text is back), restarts the server and shows the log.
//
// node code-server-e2e.mjs URL WORKSPACE_DIR OUT_DIR USER_SETTINGS   (run by code-server-e2e.sh)
import { createRequire } from "node:module";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const require = createRequire(process.env.EXLSP_E2E_MODULES + "/");
const puppeteer = require("puppeteer-core");

const [url, workspace, out, userSettings] = process.argv.slice(2);
const file = join(workspace, "shapes.py");
const results = { checks: [], notes: {} };
const check = (name, ok, detail) => {
  results.checks.push({ name, ok: !!ok, detail });
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${ok || detail === undefined ? "" : ` -- ${JSON.stringify(detail)}`}`);
  return ok;
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nbsp = (s) => s.replace(/\u00a0/g, " ");

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
  ],
  defaultViewport: { width: 1400, height: 900 },
});
const page = await browser.newPage();
const shot = (name) => page.screenshot({ path: join(out, `${name}.png`) });

/** The exlsp status bar item: [text, tooltip (aria-label)], or [null, null]. */
async function statusItem() {
  return page.evaluate(() => {
    const el = [...document.querySelectorAll(".statusbar-item")].find((e) => /exlsp/.test(e.textContent || ""));
    return el ? [(el.textContent || "").trim(), el.getAttribute("aria-label") || ""] : [null, null];
  });
}

async function waitForStatus(pred, timeoutMs, seen) {
  const deadline = Date.now() + timeoutMs;
  let item = [null, null];
  while (Date.now() < deadline) {
    item = await statusItem();
    if (seen && item[0] && !seen.includes(item[0])) seen.push(item[0]);
    if (pred(item)) return item;
    await sleep(250);
  }
  return null;
}

/** The ghost text on screen: the inline part, then the lines below; null when none. */
async function ghostText() {
  return page.evaluate(() => {
    const parts = [...document.querySelectorAll(".ghost-text-decoration, .ghost-text-decoration-preview")]
      .map((el) => el.textContent || "");
    const lines = [...document.querySelectorAll(".ghost-text .view-line")].map((el) => el.textContent || "");
    if (parts.length === 0 && lines.length === 0) return null;
    return [parts.join(""), ...lines].join("\n");
  });
}

async function press(...keys) {
  for (const key of keys.slice(0, -1)) await page.keyboard.down(key);
  await page.keyboard.press(keys[keys.length - 1]);
  for (const key of keys.slice(0, -1).reverse()) await page.keyboard.up(key);
}

/** Types the chunks ("\n" is Enter) until a ghost text shows; the ghost text or null. */
async function typeUntilGhost(chunks, waitMs = 15000) {
  let ghost = null;
  for (const chunk of chunks) {
    if (chunk === "\n") {
      await page.keyboard.press("Enter");
    } else {
      await page.keyboard.type(chunk, { delay: 60 });
    }
    const deadline = Date.now() + waitMs;
    while (Date.now() < deadline && !(ghost = await ghostText())) await sleep(200);
    if (ghost) break;
  }
  return ghost;
}

async function focusEditorEnd() {
  await page.click('.monaco-editor[data-uri$="shapes.py"] .view-lines');
  await press("Control", "End");
}

/** Runs a command from the palette by its title. */
async function runCommand(title) {
  await page.keyboard.press("F1");
  await page.waitForSelector(".quick-input-widget .quick-input-box input", { visible: true, timeout: 10000 });
  await page.keyboard.type(title, { delay: 20 });
  await sleep(800);
  await page.keyboard.press("Enter");
  await sleep(500);
}

function userSetting(key) {
  const text = readFileSync(userSettings, "utf8");
  return JSON.parse(text)[key];
}

try {
  await page.goto(`${url}/?folder=${encodeURIComponent(workspace)}`, { waitUntil: "domcontentloaded" });
  await page.waitForSelector(".monaco-workbench", { timeout: 120000 });
  check("workbench loaded", true);
  await sleep(3000);

  // Open the file from the Explorer.
  const row = await page.waitForSelector('.explorer-folders-view .monaco-list-row[aria-label^="shapes.py"]', {
    timeout: 60000,
  });
  await row.click();
  await page.waitForSelector('.monaco-editor[data-uri$="shapes.py"] .view-lines', { timeout: 30000 });
  check("editor opened shapes.py", true);

  // Ready when the tooltip says the model is loaded (the text is "$(sparkle) exlsp").
  const statusSeen = [];
  const ready = await waitForStatus(([, tip]) => tip && /model loaded|error/.test(tip), 240000, statusSeen);
  results.notes.statusTooltip = ready && ready[1];
  check("status bar item says the model is loaded", ready && /model loaded/.test(ready[1]), ready);
  await shot("1-ready");

  // Type at the end of the file, like a person; Tab accepts the ghost text.
  const original = readFileSync(file, "utf8");
  await focusEditorEnd();
  const ghost = await typeUntilGhost(["def diameter(radius):", "\n", "return "]);
  await shot("2-ghost");
  results.notes.ghost = ghost;
  if (check("ghost text shown", ghost && ghost.trim().length > 0, ghost)) {
    await page.keyboard.press("Tab");
    await sleep(500);
    await press("Control", "s");
    await sleep(2000);
    await shot("3-accepted");
    const saved = readFileSync(file, "utf8");
    results.notes.saved = saved;
    const shown = nbsp(ghost).replace(/\s+$/, "");
    check("Tab accepted the suggestion: the saved file ends with the ghost text", nbsp(saved).trimEnd().endsWith(shown), {
      shown,
      saved,
    });
    check("the saved file is the original plus what was typed and accepted", saved.startsWith(original) && saved.length > original.length);
  }
  const afterAccept = await waitForStatus(([text]) => /ms/.test(text || ""), 5000);
  check("status bar shows the last suggestion's latency", afterAccept, await statusItem());
  // Collect the texts the item showed while the workspace was being indexed.
  await waitForStatus(() => false, 3000, statusSeen);
  results.notes.statusTextsSeen = statusSeen;

  // The status bar item opens the menu; "Disable completions" turns them off.
  await page.evaluate(() => {
    const el = [...document.querySelectorAll(".statusbar-item")].find((e) => /exlsp/.test(e.textContent || ""));
    (el.querySelector("a, .statusbar-item-label") || el).click();
  });
  const menuRow = await page
    .waitForSelector('.quick-input-widget .monaco-list-row[aria-label*="Disable completions"]', {
      visible: true,
      timeout: 10000,
    })
    .catch(() => null);
  await shot("4-menu");
  if (check("the status bar item opens the exlsp menu", menuRow)) {
    await menuRow.click();
    const off = await waitForStatus(([text]) => /exlsp off/.test(text || ""), 10000);
    check("Disable completions: the status bar says off", off, await statusItem());
    check("Disable completions: the user setting is false", userSetting("exlsp.completion.enabled") === false, userSetting("exlsp.completion.enabled"));
    await focusEditorEnd();
    await page.keyboard.press("Enter");
    await page.keyboard.press("Enter");
    const none = await typeUntilGhost(["def volume(side):", "\n", "return "], 5000);
    await shot("5-disabled");
    check("no ghost text while completions are off", none === null, none);

    await runCommand("exlsp: Enable Completions");
    const on = await waitForStatus(([text]) => text && !/off/.test(text), 10000);
    check("Enable Completions (command palette): the status bar is back on", on, await statusItem());
    check("Enable Completions: the user setting is true", userSetting("exlsp.completion.enabled") === true);
    await focusEditorEnd();
    const again = await typeUntilGhost([" * ", "side", " * "]);
    await shot("6-enabled");
    check("ghost text is back once enabled", again && again.trim().length > 0, again);
    await page.keyboard.press("Escape");
  }

  // Restart: the item goes through "starting" and says the model is loaded again.
  await runCommand("exlsp: Restart Server");
  const restarting = await waitForStatus(([, tip]) => tip && !/model loaded/.test(tip), 15000);
  const reloaded = await waitForStatus(([, tip]) => tip && /model loaded/.test(tip), 240000);
  check("Restart Server: the server came back with the model loaded", restarting && reloaded, {
    restarting,
    reloaded,
  });

  // Show Log: the Output panel shows the extension's channel (the end of it).
  await runCommand("exlsp: Show Log");
  const log = await page
    .waitForFunction(
      () => {
        const panel = document.querySelector(".part.panel");
        // The channel picker: a <select> or Monaco's custom select box.
        const select = panel && panel.querySelector("select, .monaco-select-box");
        const channel = !select
          ? ""
          : select.selectedOptions && select.selectedOptions[0]
            ? select.selectedOptions[0].textContent
            : select.getAttribute("title") || select.textContent;
        const text = panel ? [...panel.querySelectorAll(".view-lines")].map((e) => e.textContent).join("\n") : "";
        return (channel || "").trim() === "exlsp" && /exlsp/.test(text) ? text : null;
      },
      { timeout: 15000 },
    )
    .then((h) => h.jsonValue())
    .catch(() => null);
  await shot("7-log");
  check("Show Log: the Output panel shows the exlsp channel", log, log && log.slice(-300));
  results.notes.statusAfter = await statusItem();
} catch (error) {
  results.error = String(error && error.stack ? error.stack : error);
  console.log("ERROR", results.error);
  await shot("error").catch(() => undefined);
} finally {
  writeFileSync(join(out, "observations.json"), JSON.stringify(results, null, 2));
  await browser.close();
}
const failed = results.error || results.checks.some((c) => !c.ok);
console.log(failed ? "FAILED" : "PASS");
process.exit(failed ? 1 : 0);
