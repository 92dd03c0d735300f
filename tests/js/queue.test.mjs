// node --test tests/js: the queue's cases, without a browser.
import { test } from "node:test";
import { cases } from "./queue_cases.mjs";

for (const [name, body] of Object.entries(cases)) test(name, body);
