// Build the browser app into dist/: dist/index.html + dist/static/<name>-<hash>.{js,css}.
// Hashed asset names let the server cache them forever; index.html is served no-cache.
// Usage: node build.mjs [--dev]   (--dev: no minification, inline source maps)
import * as esbuild from 'esbuild'
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { dirname, join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const out = join(here, 'dist')
const dev = process.argv.includes('--dev')

rmSync(out, { recursive: true, force: true })
mkdirSync(join(out, 'static'), { recursive: true })

const result = await esbuild.build({
  entryPoints: ['src/main.js', 'src/app.css'],
  bundle: true,
  format: 'esm',
  target: ['es2020'],
  minify: !dev,
  sourcemap: dev ? 'inline' : false,
  entryNames: '[name]-[hash]',
  outdir: 'dist/static',
  metafile: true,
  absWorkingDir: here,
  legalComments: 'none',
  logLevel: 'warning'
})

const assets = {}
for (const [file, info] of Object.entries(result.metafile.outputs)) {
  if (info.entryPoint) assets[info.entryPoint.replace(/^.*\//, '')] = '/' + relative(out, join(here, file)).split('\\').join('/')
}
const html = readFileSync(join(here, 'src', 'index.html'), 'utf8')
  .replace('%APP_JS%', assets['main.js'])
  .replace('%APP_CSS%', assets['app.css'])
writeFileSync(join(out, 'index.html'), html)
console.log('built', Object.values(assets).join(' '))
