// The Node clients of the client matrix, each driven against a running gateway (in front of the emulator).
// Usage: GATEWAY_URL=http://127.0.0.1:PORT GATEWAY_TOKEN=gw-… node matrix.mjs
// Prints one JSON object: {"<client> <check>": {"ok": bool, "detail": string}}. Every check asserts what
// the emulator is known to answer, so a client that parses something else fails its check.
import OpenAI from "openai";
import { OpenRouter } from "@openrouter/sdk";
import * as orErrors from "@openrouter/sdk/models/errors";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { createOpenRouter } from "@openrouter/ai-sdk-provider";
import { APICallError, embed, generateText, streamText } from "ai";

const URL = process.env.GATEWAY_URL;
const TOKEN = process.env.GATEWAY_TOKEN;
const MODEL = "openai/gpt-4o-mini";
const EMBEDDER = "openai/text-embedding-3-small";
const REFUSED = "emulator/data-policy"; // the emulator answers 404 "No endpoints found matching your data policy"
const REPLY = "Hello from the emulator.";
const MESSAGES = [{ role: "user", content: "Say hello, please!" }];

function expect(condition, what) {
  if (!condition) throw new Error(`expected ${what}`);
}

async function rejects(promise, check, what) {
  try {
    await promise;
  } catch (error) {
    expect(check(error), `${what}, got ${error?.constructor?.name}: ${error?.message}`);
    return `${error.constructor.name}: ${String(error.message).slice(0, 80)}`;
  }
  throw new Error(`expected ${what}, but the call succeeded`);
}

const openai = () => new OpenAI({ baseURL: `${URL}/v1`, apiKey: TOKEN, maxRetries: 0 });
const openrouter = () => new OpenRouter({ apiKey: TOKEN, serverURL: `${URL}/api/v1`, retryConfig: { strategy: "none" } });
const compatible = () => createOpenAICompatible({ name: "gateway", baseURL: `${URL}/v1`, apiKey: TOKEN });
const orProvider = () => createOpenRouter({ apiKey: TOKEN, baseURL: `${URL}/api/v1` });

const checks = {
  "openai-node chat": async () => {
    const done = await openai().chat.completions.create({ model: MODEL, messages: MESSAGES });
    expect(done.choices[0].message.content === REPLY && done.id.startsWith("gen-"), "the reply and a gen- id");
    return done.id;
  },
  "openai-node stream": async () => {
    let text = "";
    let usage = null;
    for await (const chunk of await openai().chat.completions.create({ model: MODEL, messages: MESSAGES, stream: true })) {
      text += chunk.choices[0]?.delta?.content ?? "";
      usage = chunk.usage ?? usage;
    }
    expect(text === REPLY && usage?.completion_tokens === 5, "the streamed reply and its usage");
    return text;
  },
  "openai-node errors": async () =>
    (await rejects(openai().chat.completions.create({ model: REFUSED, messages: MESSAGES }),
      (e) => e instanceof OpenAI.NotFoundError && e.status === 404 && e.message.includes("data policy"),
      "a NotFoundError naming the data policy")) + " / " +
    (await rejects(new OpenAI({ baseURL: `${URL}/v1`, apiKey: "gw-not-a-token", maxRetries: 0 })
      .chat.completions.create({ model: MODEL, messages: MESSAGES }),
      (e) => e instanceof OpenAI.AuthenticationError, "an AuthenticationError")),
  "openai-node embeddings": async () => {
    const vectors = await openai().embeddings.create({ model: EMBEDDER, input: ["one", "two"] });
    expect(vectors.data.length === 2 && vectors.data[0].embedding.length === 16, "two 16-dimension vectors");
    return `${vectors.data.length} vectors`;
  },
  "openai-node responses": async () => {
    const client = openai();
    const done = await client.responses.create({ model: MODEL, input: "Say hello, please!" });
    expect(done.output_text === REPLY && done.usage.output_tokens === 5, "output_text and usage");
    let streamed = "";
    let completed = null;
    for await (const event of await client.responses.create({ model: MODEL, input: "hi", stream: true })) {
      if (event.type === "response.output_text.delta") streamed += event.delta;
      if (event.type === "response.completed") completed = event.response;
    }
    expect(streamed === REPLY && completed?.usage?.output_tokens === 5, "streamed deltas and response.completed");
    return done.id;
  },

  "openrouter-ts chat": async () => {
    const done = await openrouter().chat.send({ chatRequest: { model: MODEL, messages: MESSAGES } });
    expect(done.choices[0].message.content === REPLY, "the reply");
    return done.id;
  },
  "openrouter-ts stream": async () => {
    let text = "";
    let usage = null;
    const stream = await openrouter().chat.send({ chatRequest: { model: MODEL, messages: MESSAGES, stream: true } });
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? "";
      usage = chunk.usage ?? usage;
    }
    expect(text === REPLY && usage?.completionTokens === 5, "the streamed reply and its usage");
    return text;
  },
  "openrouter-ts errors": async () =>
    (await rejects(openrouter().chat.send({ chatRequest: { model: REFUSED, messages: MESSAGES } }),
      (e) => e instanceof orErrors.NotFoundResponseError && e.message.includes("data policy"),
      "a NotFoundResponseError")) + " / " +
    (await rejects(new OpenRouter({ apiKey: "gw-not-a-token", serverURL: `${URL}/api/v1` })
      .chat.send({ chatRequest: { model: MODEL, messages: MESSAGES } }),
      (e) => e instanceof orErrors.UnauthorizedResponseError, "an UnauthorizedResponseError")),
  "openrouter-ts embeddings": async () => {
    const vectors = await openrouter().embeddings.generate({ requestBody: { model: EMBEDDER, input: ["one", "two"] } });
    expect(vectors.data?.length === 2 && vectors.data[0].embedding.length === 16, "two 16-dimension vectors");
    return `${vectors.data.length} vectors`;
  },
  "openrouter-ts responses": async () => {
    const done = await openrouter().responses.send({ responsesRequest: { model: MODEL, input: "Say hello, please!" } });
    const text = done.output.flatMap((item) => item.content ?? []).map((part) => part.text ?? "").join("");
    expect(text === REPLY && done.usage?.outputTokens === 5, "the output text and usage");
    return done.id;
  },
  "openrouter-ts models": async () => {
    const sdk = openrouter();
    const count = await sdk.models.count();
    const all = (await sdk.models.list()).result.data.map((m) => m.id);
    const mine = (await sdk.models.listForUser({ bearer: TOKEN })).result.data.map((m) => m.id);
    const one = await sdk.models.get({ author: "openai", slug: "gpt-4o-mini" });
    const endpoints = await sdk.endpoints.list({ author: "openai", slug: "gpt-4o-mini" });
    const embedders = (await sdk.embeddings.listModels()).result.data.map((m) => m.id);
    expect(count.data.count === all.length, "count == the listed models");
    expect(all.includes(REFUSED) && !mine.includes(REFUSED) && mine.length === all.length - 1, "listForUser filtered");
    expect(one.data.id === MODEL && endpoints.data.endpoints[0].modelId === MODEL, "get and endpoints.list");
    expect(embedders.length === 1 && embedders[0] === EMBEDDER, "embeddings.listModels");
    return `${count.data.count} models, ${mine.length} for the user`;
  },

  "ai-sdk-compatible chat": async () => {
    const { text } = await generateText({ model: compatible().chatModel(MODEL), prompt: "Say hello, please!", maxRetries: 0 });
    expect(text === REPLY, "the reply");
    return text;
  },
  "ai-sdk-compatible stream": async () => {
    const result = streamText({ model: compatible().chatModel(MODEL), prompt: "Say hello, please!", maxRetries: 0 });
    let text = "";
    for await (const part of result.textStream) text += part;
    expect(text === REPLY, "the streamed reply");
    return text;
  },
  "ai-sdk-compatible errors": async () =>
    rejects(generateText({ model: compatible().chatModel(REFUSED), prompt: "hi", maxRetries: 0 }),
      (e) => APICallError.isInstance(e) && e.statusCode === 404 && e.message.includes("data policy"),
      "an APICallError with status 404"),
  "ai-sdk-compatible embeddings": async () => {
    const { embedding } = await embed({ model: compatible().embeddingModel(EMBEDDER), value: "one", maxRetries: 0 });
    expect(embedding.length === 16, "a 16-dimension vector");
    return `${embedding.length} dimensions`;
  },

  "ai-sdk-openrouter chat": async () => {
    const { text } = await generateText({ model: orProvider().chat(MODEL), prompt: "Say hello, please!", maxRetries: 0 });
    expect(text === REPLY, "the reply");
    return text;
  },
  "ai-sdk-openrouter stream": async () => {
    const result = streamText({ model: orProvider().chat(MODEL), prompt: "Say hello, please!", maxRetries: 0 });
    let text = "";
    for await (const part of result.textStream) text += part;
    const usage = await result.usage;
    expect(text === REPLY && usage.outputTokens === 5, "the streamed reply and its usage");
    return text;
  },
  "ai-sdk-openrouter errors": async () =>
    rejects(generateText({ model: orProvider().chat(REFUSED), prompt: "hi", maxRetries: 0 }),
      (e) => APICallError.isInstance(e) && e.statusCode === 404 && e.message.includes("data policy"),
      "an APICallError with status 404"),
  "ai-sdk-openrouter embeddings": async () => {
    const { embedding } = await embed({ model: orProvider().textEmbeddingModel(EMBEDDER), value: "one", maxRetries: 0 });
    expect(embedding.length === 16, "a 16-dimension vector");
    return `${embedding.length} dimensions`;
  },
};

const results = {};
for (const [name, check] of Object.entries(checks)) {
  try {
    results[name] = { ok: true, detail: String(await check()) };
  } catch (error) {
    results[name] = { ok: false, detail: `${error?.constructor?.name}: ${error?.message}`.slice(0, 2000) };
  }
}
process.stdout.write(JSON.stringify(results) + "\n");
