// Driven by test/drab/presence/drab_integration_test.exs (tag :drab): real
// browsers (headless Chromium through puppeteer-core, no browser download)
// on a real Drab 0.10 page, with Drab's own JS. It checks, through the
// server's /counts (Drab.Presence.count_users/1, count_connections/1), that
// connecting tracks, that a commander's subscribe/unsubscribe starts and
// stops tracking on another topic, that closing a tab leaves, and that the
// presence_diff broadcasts reach the page on Drab's channel.
//
//   node drab_browser.mjs http://127.0.0.1:PORT [/usr/bin/chromium]
//
// DRAB_BROWSER_SCREENSHOT=file.png saves the first tab once Drab connected.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";
import puppeteer from "puppeteer-core";

const [base, chromium = "/usr/bin/chromium"] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), "drab-presence-chromium-"));
const log = (...args) => console.log("drab_browser:", ...args);
const watchdog = setTimeout(() => {
  log("timed out after 90 s");
  process.exit(1);
}, 90000);

async function getJSON(path) {
  const res = await fetch(base + path);
  assert.equal(res.status, 200, `${path}: HTTP ${res.status}`);
  return res.json();
}

async function counts(topic) {
  return getJSON("/counts?topic=" + encodeURIComponent(topic));
}

// Polls until the counts on a topic are as expected (diffs and exits are
// asynchronous), failing with the last value seen.
async function expectCounts(topic, want, what) {
  let last;
  for (let i = 0; i < 100; i++) {
    last = await counts(topic);
    if (last.users === want.users && last.connections === want.connections) {
      log(`${what}: ${topic} has ${last.users} user(s), ${last.connections} connection(s)`);
      return last;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`${what}: ${topic}: want ${JSON.stringify(want)}, got ${JSON.stringify(last)}`);
}

async function openTab(context, name) {
  const page = await context.newPage();
  page.on("console", (msg) => log(`[${name} console]`, msg.text()));
  page.on("pageerror", (err) => log(`[${name} page error]`, err.message));
  await page.goto(base + "/", { waitUntil: "load" });
  await page.waitForFunction("window.Drab_connected === true", { timeout: 15000, polling: 100 });
  if (process.env.DRAB_BROWSER_SCREENSHOT && !openTab.shot) {
    openTab.shot = true;
    await page.screenshot({ path: process.env.DRAB_BROWSER_SCREENSHOT });
    log(`screenshot of ${name}: ${process.env.DRAB_BROWSER_SCREENSHOT}`);
  }
  return page;
}

// A real click event on the button, which Drab's drab-click listener turns
// into a call of the commander's handler. Dispatched in the page, as tabs in
// the background do not get puppeteer's mouse clicks.
async function click(page, selector) {
  await page.evaluate((sel) => document.querySelector(sel).click(), selector);
}

// (Polled by interval: a background tab runs no animation frames.)
// Waits until the page has seen, on Drab's channel, at least `times`
// presence_diff broadcasts with `key` among their `kind` ("joins" or
// "leaves"), and returns the last one.
async function expectDiff(page, name, what, kind, key, times = 1) {
  const seen = (kind, key) =>
    window.presenceDiffs.filter((d) => d[kind] && Object.keys(d[kind]).includes(key));
  try {
    await page.waitForFunction(
      `(${seen.toString()})(${JSON.stringify(kind)}, ${JSON.stringify(key)}).length >= ${times}`,
      { timeout: 10000, polling: 100 }
    );
  } catch (e) {
    const diffs = await page.evaluate("JSON.stringify(window.presenceDiffs)");
    assert.fail(`${what}: ${times} presence_diff(s) with ${key} in ${kind} did not reach ${name}; it saw ${diffs}`);
  }
  const diffs = await page.evaluate(`(${seen.toString()})(${JSON.stringify(kind)}, ${JSON.stringify(key)})`);
  log(`${what}: presence_diff reached ${name}:`, JSON.stringify(diffs[diffs.length - 1]));
  return diffs[diffs.length - 1];
}

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  userDataDir: profile,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});

try {
  const { page: pageTopic, room } = await getJSON("/topics");
  await expectCounts(pageTopic, { users: 0, connections: 0 }, "before any browser");

  // Two tabs of one browser share Drab's client id (localStorage): one user,
  // two connections. A third tab in a separate context is a second user.
  const main = browser.defaultBrowserContext();
  const a = await openTab(main, "A");
  await expectCounts(pageTopic, { users: 1, connections: 1 }, "A connected");
  const b = await openTab(main, "B");
  await expectCounts(pageTopic, { users: 1, connections: 2 }, "B connected");
  const other = await browser.createBrowserContext();
  const c = await openTab(other, "C");
  await expectCounts(pageTopic, { users: 2, connections: 3 }, "C connected");

  const keyC = await c.evaluate("Drab.myid");
  const keyA = await a.evaluate("Drab.myid");
  assert.notEqual(keyA, keyC);
  const listed = await counts(pageTopic);
  assert.deepEqual([...listed.keys].sort(), [keyA, keyC].sort());
  await expectDiff(a, "A", "C's join", "joins", keyC);

  // Subscribe and unsubscribe from the commander (drab-click handlers).
  await click(a, "#sub");
  await expectCounts(room, { users: 1, connections: 1 }, "A subscribed");
  await click(c, "#sub");
  await expectCounts(room, { users: 2, connections: 2 }, "C subscribed");
  // Drab's channel pushes the broadcasts of subscribed topics to the page
  // too: a second diff joining C, the room's.
  await expectDiff(a, "A", "C's join of the room", "joins", keyC, 2);
  await click(a, "#unsub");
  await expectCounts(room, { users: 1, connections: 1 }, "A unsubscribed");
  await expectCounts(pageTopic, { users: 2, connections: 3 }, "page topic unchanged by the room");

  // Tab close: B's connection leaves (A, same user, stays), then C leaves
  // both topics, and A sees C's leave.
  await b.close();
  await expectCounts(pageTopic, { users: 2, connections: 2 }, "B closed");
  await c.close();
  await expectCounts(pageTopic, { users: 1, connections: 1 }, "C closed");
  await expectCounts(room, { users: 0, connections: 0 }, "C closed");
  await expectDiff(a, "A", "C's leave", "leaves", keyC);

  await a.close();
  await expectCounts(pageTopic, { users: 0, connections: 0 }, "A closed");
  log("all checks passed");
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
  clearTimeout(watchdog);
}
