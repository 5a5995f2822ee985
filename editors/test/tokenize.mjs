// Tokenises .opf files with the TextMate grammar as VS Code does (vscode-textmate on the
// Oniguruma regex engine compiled to WebAssembly) and prints every token's scopes as JSON:
//
//   node tokenize.mjs GRAMMAR.json FILE...
//   -> {"FILE": [[[start, end, ["source.opf", ...]], ...], ...], ...}   one list per line
//
// tests/test_editor_grammar.py runs it and compares the scopes with what opf's own parser
// says each character is. Install the two packages first: npm ci (in this folder).
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import textmate from 'vscode-textmate';
import oniguruma from 'vscode-oniguruma';

const [grammarPath, ...files] = process.argv.slice(2);
if (!grammarPath || files.length === 0) {
  console.error('usage: node tokenize.mjs GRAMMAR.json FILE...');
  process.exit(2);
}

const require = createRequire(import.meta.url);
const wasm = readFileSync(require.resolve('vscode-oniguruma/release/onig.wasm')).buffer;
const onigLib = oniguruma.loadWASM(wasm).then(() => ({
  createOnigScanner: (patterns) => new oniguruma.OnigScanner(patterns),
  createOnigString: (text) => new oniguruma.OnigString(text),
}));

const registry = new textmate.Registry({
  onigLib,
  loadGrammar: async (scopeName) => {
    const raw = textmate.parseRawGrammar(readFileSync(grammarPath, 'utf8'), grammarPath);
    return raw.scopeName === scopeName ? raw : null;
  },
});

const raw = JSON.parse(readFileSync(grammarPath, 'utf8'));
const grammar = await registry.loadGrammar(raw.scopeName);
if (!grammar) {
  console.error(`no grammar for ${raw.scopeName} in ${grammarPath}`);
  process.exit(2);
}

const out = {};
for (const file of files) {
  let stack = textmate.INITIAL;
  out[file] = readFileSync(file, 'utf8').replace(/\r\n?/g, '\n').split('\n').map((line) => {
    const result = grammar.tokenizeLine(line, stack);
    stack = result.ruleStack;
    return result.tokens.map((t) => [t.startIndex, t.endIndex, t.scopes]);
  });
}
process.stdout.write(JSON.stringify(out));
