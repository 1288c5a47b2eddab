// Drives code-server (Code-OSS in the browser) with headless Chromium:
// opens a Python file with the exlsp extension installed, types, waits for
// the ghost text, accepts it with Tab, saves, and checks the file on disk.
//
// node code-server-e2e.mjs URL WORKSPACE_DIR OUT_DIR   (run by code-server-e2e.sh)
import { createRequire } from "node:module";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const require = createRequire(process.env.EXLSP_E2E_MODULES + "/");
const puppeteer = require("puppeteer-core");

const [url, workspace, out] = process.argv.slice(2);
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
  args: ["--no-sandbox", "--disable-gpu", "--window-size=1400,900"],
  defaultViewport: { width: 1400, height: 900 },
});
const page = await browser.newPage();
const shot = (name) => page.screenshot({ path: join(out, `${name}.png`) });

async function statusText() {
  return page.evaluate(() => {
    const items = [...document.querySelectorAll(".statusbar-item")];
    const item = items.find((el) => /exlsp/.test(el.textContent || "") || /exlsp/.test(el.id || ""));
    return item ? (item.textContent || "").trim() : null;
  });
}

async function ghostText() {
  return page.evaluate(() => {
    const parts = [...document.querySelectorAll(".ghost-text-decoration, .ghost-text-decoration-preview")]
      .map((el) => el.textContent || "");
    const lines = [...document.querySelectorAll(".ghost-text .view-line")].map((el) => el.textContent || "");
    if (parts.length === 0 && lines.length === 0) return null;
    return [parts.join(""), ...lines].join("\n");
  });
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
  let status = null;
  let tooltip = null;
  const statusDeadline = Date.now() + 240000;
  while (Date.now() < statusDeadline) {
    [status, tooltip] = await page.evaluate(() => {
      const el = [...document.querySelectorAll(".statusbar-item")].find((e) => /exlsp/.test(e.textContent || ""));
      return el ? [(el.textContent || "").trim(), el.getAttribute("aria-label") || ""] : [null, null];
    });
    if (tooltip && /model loaded|error/.test(tooltip)) break;
    await sleep(500);
  }
  results.notes.status = status;
  results.notes.statusTooltip = tooltip;
  check("status bar item says the model is loaded", tooltip && /model loaded/.test(tooltip), tooltip);
  await shot("1-ready");

  // Type at the end of the file, like a person.
  await page.click('.monaco-editor[data-uri$="shapes.py"] .view-lines');
  await page.keyboard.down("Control");
  await page.keyboard.press("End");
  await page.keyboard.up("Control");
  const typed = ["def diameter(radius):", "\n", "return "];
  let ghost = null;
  for (const chunk of typed) {
    if (chunk === "\n") {
      await page.keyboard.press("Enter");
    } else {
      await page.keyboard.type(chunk, { delay: 60 });
    }
    const deadline = Date.now() + 15000;
    while (Date.now() < deadline && !(ghost = await ghostText())) await sleep(200);
    if (ghost) break;
  }
  await shot("2-ghost");
  results.notes.ghost = ghost;
  if (check("ghost text shown", ghost && ghost.trim().length > 0, ghost)) {
    const before = readFileSync(file, "utf8");
    await page.keyboard.press("Tab");
    await sleep(500);
    await page.keyboard.down("Control");
    await page.keyboard.press("s");
    await page.keyboard.up("Control");
    await sleep(2000);
    await shot("3-accepted");
    const saved = readFileSync(file, "utf8");
    results.notes.saved = saved;
    const firstGhostLine = nbsp(ghost.split("\n")[0]).trim();
    check("Tab accepted the suggestion: the saved file holds its text", nbsp(saved).includes(firstGhostLine), {
      firstGhostLine,
      saved,
    });
    check("the file changed on disk", saved !== before && saved.length > before.length);
  }
  results.notes.statusAfter = await statusText();
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
