// One browser running Element Call, in a process of its own, for tests/element_call.rs: Debian's
// Chromium (fake camera and microphone, media permissions granted) driven by playwright-core.
//
// usage: node browser.mjs CONSOLE_LOG
// stdin, one JSON object per line:
//   {"do": "create", "url", "call", "name"}   open the app at `url`, create the call `call` as a
//                                             new passwordless user named `name`, join it
//   {"do": "join", "url", "name"}             open the call's link `url` as a new user, join it
//   {"do": "hangup"}                          Element Call's own hang-up button
//   {"do": "close"}                           close the tab (as a user closing it)
//   {"do": "media"}                           what the call shows: {"event": "media", "tiles",
//                                             "videos", "playing"}
//   {"do": "screenshot", "path"}
//   end of input: the browser is closed and the process exits.
// stdout, one JSON object per line:
//   {"event": "ready", "pid"}                 the browser's process id (a process group of its own)
//   {"event": "in_call", "url", "user_id", "device_id"}
//   {"event": "done", "do"}                   a command carried out
//   {"event": "error", "do", "error"}
// CONSOLE_LOG: the page's console messages and errors, one per line, for a failing test to print;
// a failed command leaves a screenshot next to it.
import { appendFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";

import { chromium } from "playwright-core";

const consoleLog = process.argv[2];
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const log = (line) => appendFileSync(consoleLog, `${new Date().toISOString()} ${line}\n`);

// Launched as a server so that its process (a process group of its own) is known: a test kills it.
const server = await chromium.launchServer({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--mute-audio",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    // WebRTC between this browser and a LiveKit server on the same machine.
    "--allow-loopback-in-peer-connection",
  ],
});
const browser = await chromium.connect(server.wsEndpoint());
const context = await browser.newContext({ permissions: ["camera", "microphone"] });
let page = await context.newPage();
page.on("console", (m) => log(`console.${m.type()}: ${m.text()}`));
page.on("pageerror", (e) => log(`pageerror: ${e.message}`));
page.on("requestfailed", (r) => log(`requestfailed: ${r.method()} ${r.url()} ${r.failure()?.errorText}`));
emit({ event: "ready", pid: server.process().pid });

const STEP = { timeout: 60_000 };

// The user Element Call registered, as it keeps it.
async function who() {
  const auth = await page.evaluate(() => localStorage.getItem("matrix-auth-store"));
  const parsed = auth ? JSON.parse(auth) : {};
  return { user_id: parsed.user_id, device_id: parsed.device_id };
}

async function inCall() {
  await page.getByTestId("incall_leave").waitFor(STEP);
  emit({ event: "in_call", url: page.url(), ...(await who()) });
}

const commands = {
  async create({ url, call, name }) {
    await page.goto(url);
    await page.getByTestId("home_callName").fill(call, STEP);
    await page.getByTestId("home_displayName").fill(name, STEP);
    await page.getByTestId("home_go").click(STEP);
    await page.getByTestId("lobby_joinCall").click(STEP);
    await inCall();
  },
  async join({ url, name }) {
    await page.goto(url);
    await page.getByTestId("joincall_displayName").fill(name, STEP);
    await page.getByTestId("joincall_joincall").click(STEP);
    await page.getByTestId("lobby_joinCall").click(STEP);
    await inCall();
  },
  async hangup() {
    await page.getByTestId("incall_leave").click(STEP);
  },
  // As a user closing the tab: the page's beforeunload and pagehide handlers run (livekit-client
  // says goodbye to LiveKit from them), a "leave site?" prompt is accepted, and the tab goes.
  async close() {
    page.on("dialog", (d) => d.accept().catch(() => {}));
    const closed = page.waitForEvent("close", STEP);
    await page.close({ runBeforeUnload: true });
    await closed;
  },
  // The call's tiles, and which of its videos play (a size, and time advancing over a second).
  async media() {
    const sample = () =>
      page.evaluate(() =>
        [...document.querySelectorAll("video")].map((v) => ({ w: v.videoWidth, t: v.currentTime })),
      );
    const before = await sample();
    await page.waitForTimeout(1_000);
    const after = await sample();
    const tiles = await page.getByTestId("videoTile").count();
    const playing = after.filter((v, i) => v.w > 0 && before[i] && v.t > before[i].t).length;
    emit({ event: "media", tiles, videos: after.length, playing });
  },
  async screenshot({ path }) {
    await page.screenshot({ path, fullPage: true });
  },
};

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  let command;
  try {
    command = JSON.parse(line);
    await commands[command.do](command);
    emit({ event: "done", do: command.do });
  } catch (e) {
    log(`driver: ${command?.do ?? line}: ${e}`);
    // What the user would have seen, for the failing test to keep.
    const shot = join(dirname(consoleLog), `failed-${command?.do ?? "command"}-${Date.now()}.png`);
    await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
    emit({ event: "error", do: command?.do, error: String(e) });
  }
}
await browser.close();
await server.close();
