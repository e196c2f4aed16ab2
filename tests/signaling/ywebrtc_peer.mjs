// One stock y-webrtc peer (yjs + y-webrtc + simple-peer) in Node, driven over stdin/stdout.
//
// usage: node ywebrtc_peer.mjs <node_modules dir> <signaling url> <room>
// WebRTC comes from @roamhq/wrtc (libwebrtc). The Python test runs this inside a network
// namespace that only has `lo`, so no ICE candidate or packet can leave loopback.
//   stdin : {"cmd":"insert","index":0,"text":"…"} | {"cmd":"text"} | {"cmd":"exit"}
//   stdout: {"event":"ready","peerId":…} | {"event":"status","connected":bool}
//           {"event":"peers","webrtcPeers":[…],"bcPeers":[…]} | {"event":"synced","synced":bool}
//           {"event":"text","text":…} | {"reply":…}
import { createRequire } from 'node:module'
import * as path from 'node:path'
import * as readline from 'node:readline'

const [modules, url, room] = process.argv.slice(2)
const require = createRequire(path.join(modules, 'package.json'))
console.log = console.error
console.info = console.error
globalThis.WebSocket = require('ws') // lib0's websocket client uses the global; ws also speaks ws+unix:
const Y = require('yjs')
const { WebrtcProvider } = require('y-webrtc')
const wrtc = require('@roamhq/wrtc')

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const doc = new Y.Doc()
const text = doc.getText('text')
const provider = new WebrtcProvider(room, doc, {
  signaling: [url],
  peerOpts: { wrtc, config: { iceServers: [] } } // no STUN/TURN: host candidates only
})
provider.on('status', (ev) => out({ event: 'status', connected: ev.connected }))
provider.on('peers', (ev) => out({ event: 'peers', webrtcPeers: ev.webrtcPeers, bcPeers: ev.bcPeers }))
provider.on('synced', (ev) => out({ event: 'synced', synced: ev.synced }))
text.observe(() => out({ event: 'text', text: text.toString() }))
await provider.key // y-webrtc opens its room once the (optional) password key is derived
out({ event: 'ready', peerId: provider.room.peerId })

const finish = () => {
  try { provider.destroy() } catch (e) {}
  setTimeout(() => process.exit(0), 100)
}
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const msg = JSON.parse(line)
  if (msg.cmd === 'insert') {
    text.insert(msg.index ?? text.length, msg.text)
    out({ reply: text.toString() })
  } else if (msg.cmd === 'text') {
    out({ reply: text.toString() })
  } else if (msg.cmd === 'exit') {
    finish()
  }
}).on('close', finish)
