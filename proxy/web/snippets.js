// "Copy as curl / Python / Node": the exact request the page sent, as code to run elsewhere.
//
// A request here is {endpoint: "generations" | "edits", fields: {name: value} (the body, in order),
// files: [{field: "image" | "image[]" | "mask", name}], stream, baseUrl, hasKey}. The key itself is
// never written out: the code reads $QIP_API_KEY.

// Parameters the openai packages take by name; the rest go in extra_body (Python) or the body (Node).
const SDK_PARAMS = new Set(["model", "prompt", "n", "size", "response_format", "output_format",
  "output_compression", "stream", "partial_images", "quality", "background", "user"]);

/** A word for the shell: single-quoted unless it is plainly safe. */
export function shellQuote(text) {
  const s = String(text);
  if (/^[A-Za-z0-9_.,:/=@%+-]+$/.test(s)) return s;
  return `'${s.replace(/'/g, "'\\''")}'`;
}

/** A file name safe inside curl's -F syntax and in code (no quotes, commas or semicolons). */
export function safeFileName(name, fallback) {
  const clean = String(name || "").replace(/[^A-Za-z0-9._ -]/g, "_").trim();
  return clean && !clean.startsWith(".") ? clean : fallback;
}

function formValue(value) {
  if (typeof value === "string") return value;
  if (typeof value === "object" && value !== null) return JSON.stringify(value);
  return String(value);
}

export function curl(req) {
  const url = `${req.baseUrl}/v1/images/${req.endpoint}`;
  const lines = [`curl -sS${req.stream ? " -N" : ""} ${shellQuote(url)}`];
  if (req.hasKey) lines.push(`-H "Authorization: Bearer $QIP_API_KEY"`);
  if (req.endpoint === "generations") {
    lines.push(`-H 'Content-Type: application/json'`);
    lines.push(`-d ${shellQuote(JSON.stringify(req.fields))}`);
  } else {
    for (const [name, value] of Object.entries(req.fields)) {
      // --form-string: a value starting with @ or < is text, not a file to read.
      lines.push(`--form-string ${shellQuote(`${name}=${formValue(value)}`)}`);
    }
    for (const file of req.files) lines.push(`-F ${shellQuote(`${file.field}=@${file.name}`)}`);
  }
  return lines.join(" \\\n  ");
}

function py(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(py).join(", ")}]`;
  return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v)}`).join(", ")}}`;
}

function splitParams(fields) {
  const named = [];
  const extra = [];
  for (const [name, value] of Object.entries(fields)) (SDK_PARAMS.has(name) ? named : extra).push([name, value]);
  return { named, extra };
}

function extension(req) {
  const fmt = req.fields.output_format || "png";
  return fmt === "jpeg" ? "jpg" : fmt;
}

export function python(req) {
  const edit = req.endpoint === "edits";
  const { named, extra } = splitParams(req.fields);
  const needsJson = edit && extra.some(([, v]) => typeof v === "object" && v !== null);
  const imports = ["import base64", ...(needsJson ? ["import json"] : []), "import os", "", "from openai import OpenAI", ""];
  const args = [];
  if (edit) {
    const images = req.files.filter((f) => f.field !== "mask").map((f) => `open(${JSON.stringify(f.name)}, "rb")`);
    args.push(`image=${images.length === 1 ? images[0] : `[${images.join(", ")}]`}`);
    const mask = req.files.find((f) => f.field === "mask");
    if (mask) args.push([`mask=open(${JSON.stringify(mask.name)}, "rb")`, "transparent = the area to edit"]);
  }
  for (const [name, value] of named) args.push(`${name}=${py(value)}`);
  if (extra.length) {
    // A multipart form carries text: lists go as JSON text, which the proxy reads.
    const items = extra.map(([k, v]) => `${JSON.stringify(k)}: ${
      edit && typeof v === "object" && v !== null ? `json.dumps(${py(v)})` : py(v)}`);
    args.push(`extra_body={${items.join(", ")}}`);
  }
  const lines = args.map((a) => (Array.isArray(a) ? `${a[0]},  # ${a[1]}` : `${a},`));
  const call = `client.images.${edit ? "edit" : "generate"}(\n    ${lines.join("\n    ")}\n)`;
  const ext = extension(req);
  const save = req.stream
    ? [`stream = ${call}`,
      "index = 0",
      "for event in stream:",
      "    if event.type.endswith(\".completed\"):",
      `        with open(f"image-{index}.${ext}", "wb") as f:`,
      "            f.write(base64.b64decode(event.b64_json))",
      "        index += 1"]
    : [`result = ${call}`,
      "for index, image in enumerate(result.data):",
      `    with open(f"image-{index}.${ext}", "wb") as f:`,
      "        f.write(base64.b64decode(image.b64_json))"];
  return [...imports,
    `client = OpenAI(base_url=${JSON.stringify(`${req.baseUrl}/v1`)}, api_key=os.environ.get("QIP_API_KEY", "unused"))`,
    ...save].join("\n") + "\n";
}

export function node(req) {
  const edit = req.endpoint === "edits";
  const props = []; // [code, comment]
  if (edit) {
    const images = req.files.filter((f) => f.field !== "mask").map((f) => `fs.createReadStream(${JSON.stringify(f.name)})`);
    props.push([`image: ${images.length === 1 ? images[0] : `[${images.join(", ")}]`}`, ""]);
    const mask = req.files.find((f) => f.field === "mask");
    if (mask) props.push([`mask: fs.createReadStream(${JSON.stringify(mask.name)})`, "transparent = the area to edit"]);
  }
  for (const [name, value] of Object.entries(req.fields)) {
    const key = /^[A-Za-z_$][\w$]*$/.test(name) ? name : JSON.stringify(name);
    // A multipart form carries text: lists go as JSON text, which the proxy reads.
    const text = edit && typeof value === "object" && value !== null ? JSON.stringify(JSON.stringify(value))
      : JSON.stringify(value ?? null);
    props.push([`${key}: ${text}`, ""]);
  }
  const body = `{\n  ${props.map(([code, note]) => `${code},${note ? ` // ${note}` : ""}`).join("\n  ")}\n}`;
  const call = `await client.images.${edit ? "edit" : "generate"}(${body})`;
  const ext = extension(req);
  const save = req.stream
    ? [`const stream = ${call};`,
      "let index = 0;",
      "for await (const event of stream) {",
      "  if (event.type.endsWith(\".completed\")) {",
      `    fs.writeFileSync(\`image-\${index++}.${ext}\`, Buffer.from(event.b64_json, "base64"));`,
      "  }",
      "}"]
    : [`const result = ${call};`,
      "result.data.forEach((image, index) => {",
      `  fs.writeFileSync(\`image-\${index}.${ext}\`, Buffer.from(image.b64_json, "base64"));`,
      "});"];
  return ["// Save as image.mjs; npm install openai; node image.mjs",
    "import fs from \"node:fs\";",
    "import OpenAI from \"openai\";",
    "",
    `const client = new OpenAI({ baseURL: ${JSON.stringify(`${req.baseUrl}/v1`)}, apiKey: process.env.QIP_API_KEY ?? "unused" });`,
    ...save].join("\n") + "\n";
}

export const SNIPPETS = { curl, python, node };
