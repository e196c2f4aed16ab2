// The collab web app: session panel, editor with remote cursors, collaborators, chat, server undo,
// invites. Pages: "/" (home), "/r/<room>" (a room; its shareable link), "/invite/<code>".

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { Session } from './session.js'
import { Extensions } from './ext.js'
import { createEditor } from './editor.js'
import { Collaborators } from './collaborators.js'
import { ChatPanel, authorColor } from './chatpanel.js'
import { $, avatar, colorFor, h, roomPath, roomUrl, toast } from './util.js'

const MSG_AUTH = 2
const session = new Session()
const state = { room: null, role: null, provider: null }

const parseRoute = () => {
  const path = location.pathname
  if (path.startsWith('/r/') && path.length > 3) {
    return { page: 'room', room: path.slice(3).split('/').map(decodeURIComponent).join('/') }
  }
  const invite = path.match(/^\/invite\/([A-Za-z0-9_-]+)$/)
  if (invite) return { page: 'invite', code: invite[1] }
  return { page: 'home' }
}

// -- login ---------------------------------------------------------------------------------------

const showLogin = ({ text, placeholder = 'Your name', value = '', onSubmit }) => new Promise((resolve) => {
  $('login').hidden = false
  $('login-text').textContent = text
  const input = $('login-name')
  input.placeholder = placeholder
  input.value = value
  input.focus()
  $('login-form').onsubmit = async (event) => {
    event.preventDefault()
    const value = input.value.trim()
    if (!value) return
    try {
      await onSubmit(value)
      $('login').hidden = true
      resolve()
    } catch (err) {
      $('login-error').textContent = err.message
    }
  }
})

const ensureLogin = async (room) => {
  if (await session.resolve(room)) return
  if (session.mode === 'dev') {
    await showLogin({ text: 'Open dev mode: anyone can edit every room. Pick a name to join.', onSubmit: (name) => session.devLogin(name) })
    return
  }
  await showLogin({
    text: 'This server needs an access token from your host application (open the link it gave you), or paste one here.',
    placeholder: 'Access token',
    onSubmit: async (token) => {
      const url = new URL(location.href)
      url.searchParams.set('token', token)
      history.replaceState(null, '', url)
      session.absorbUrl(room)
      if (!(await session.resolve(room))) throw new Error('That token is not valid here.')
    }
  })
}

const renderMe = () => {
  const me = session.user
  const role = state.role || me.role
  $('me').replaceChildren(...[
    avatar(me.name, colorFor(me.id)),
    h('span', { class: 'me-name', id: 'me-name' }, me.name),
    state.room ? h('span', { class: 'role role-' + role }, role) : null,
    session.mode === 'dev'
      ? h('button', { type: 'button', class: 'link', title: 'Log in under another name', onclick: () => { session.logout(); location.assign(state.room ? roomUrl(state.room) : '/') } }, 'switch user')
      : null
  ].filter(Boolean))
}

// -- session panel -------------------------------------------------------------------------------

const loadRooms = async () => {
  try {
    const { rooms } = await session.api('/api/rooms')
    const list = $('room-list')
    const shown = state.room && !rooms.some((r) => r.name === state.room) ? [...rooms, { name: state.room }] : rooms
    list.replaceChildren(...shown.map((r) => h('li', { class: r.name === state.room ? 'current' : '' },
      h('a', { href: roomUrl(r.name), dataset: { room: r.name } }, r.name),
      r.role === 'owner' ? h('span', { class: 'role role-owner' }, 'owner') : null)))
    $('rooms-empty').hidden = shown.length > 0
    return rooms
  } catch (err) {
    $('session-error').textContent = `Could not list rooms: ${err.message}`
    return []
  }
}

const setupSessionPanel = () => {
  $('create-form').addEventListener('submit', async (event) => {
    event.preventDefault()
    const name = $('create-name').value.trim()
    if (!name) return
    try {
      const room = await session.api('/api/rooms', { method: 'POST', body: { name } })
      location.assign(room.url || roomUrl(room.name))
    } catch (err) {
      $('session-error').textContent = err.status === 409 ? `“${name}” already exists: join it instead.` : err.message
    }
  })
  $('join-form').addEventListener('submit', (event) => {
    event.preventDefault()
    const value = $('join-name').value.trim()
    if (!value) return
    if (/^(https?:)?\/\//.test(value) || value.startsWith('/r/') || value.startsWith('/invite/')) {
      const url = new URL(value, location.origin)
      if (url.pathname.startsWith('/r/') || url.pathname.startsWith('/invite/')) {
        location.assign(url.pathname + url.search)
        return
      }
      $('session-error').textContent = 'That is not a room or invite link.'
      return
    }
    location.assign(roomUrl(value))
  })
  $('leave').addEventListener('click', () => {
    leaveRoom()
    location.assign('/')
  })
}

// -- a room ----------------------------------------------------------------------------------------

const setStatus = (status, text) => {
  const el = $('status')
  el.hidden = false
  el.dataset.status = status
  el.textContent = text
}

const wsBase = () => (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host

const openRoom = async (room, rooms) => {
  state.room = room
  const listed = rooms.find((r) => r.name === room)
  const known = session.roleIn(room)
  state.role = known === 'viewer' ? 'viewer' : (listed?.role || known || session.user.role)
  let readOnly = state.role === 'viewer'
  document.title = `${room} — collab`
  $('room-title').textContent = room
  $('welcome').hidden = true
  $('editor').hidden = false
  $('side').hidden = false
  $('room-tools').hidden = false
  $('leave').hidden = false
  $('readonly-badge').hidden = !readOnly
  $('invite').hidden = readOnly
  renderMe()

  const me = { ...session.user, role: state.role }
  const ydoc = new Y.Doc()
  const ytext = ydoc.getText('text')
  const provider = new WebsocketProvider(wsBase(), roomPath(room), ydoc, { params: session.params(room), disableBc: true })
  state.provider = provider
  const ext = new Extensions(provider)
  provider.awareness.setLocalStateField('user', { name: me.name, color: colorFor(me.id) })

  // A viewer's edits are refused by the server ("permission denied"): show it and lock the editor.
  const authHandler = provider.messageHandlers[MSG_AUTH]
  provider.messageHandlers[MSG_AUTH] = (...args) => {
    if (!readOnly) {
      readOnly = true
      editor.setReadOnly(true)
      $('readonly-badge').hidden = false
      toast('You can view this room but not edit it.', 'error')
    }
    return authHandler(...args)
  }

  // -- undo/redo: the server's per-user undo -------------------------------------------------
  const undoState = { can_undo: false, can_redo: false }
  const renderUndo = () => {
    $('undo').disabled = readOnly || !undoState.can_undo
    $('redo').disabled = readOnly || !undoState.can_redo
  }
  ext.on('undo.state', (b) => {
    undoState.can_undo = !!b.can_undo
    undoState.can_redo = !!b.can_redo
    renderUndo()
  })
  ext.on('error', (b) => {
    if (['undo', 'redo', 'undo.state'].includes(b.ref)) toast(`Undo: ${b.message || b.code}`, 'error')
  })
  const runHistory = (kind) => {
    if (readOnly) return
    if (!ext.send({ type: kind, id: ext.nextId++ })) toast('Undo needs a connection to the server', 'error')
  }
  $('undo').onclick = () => runHistory('undo')
  $('redo').onclick = () => runHistory('redo')

  // -- editor, collaborators, chat ------------------------------------------------------------
  let chat = null
  const editor = createEditor({
    parent: $('editor'),
    ydoc,
    ytext,
    awareness: provider.awareness,
    readOnly,
    onUndo: () => runHistory('undo'),
    onRedo: () => runHistory('redo'),
    onMarker: (id) => chat && chat.focusMessage(id),
    onSelection: (range) => chat && chat.showSelection(range)
  })
  const collaborators = new Collaborators({
    session,
    room,
    provider,
    me,
    owner: listed?.owner || null,
    onJump: (cursor) => editor.reveal(cursor.head || cursor.anchor, cursor.head || cursor.anchor)
  })
  const colors = (author) => {
    for (const s of provider.awareness.getStates().values()) if (s.user && s.user.id === author?.id && s.user.color) return s.user.color
    return author?.id === me.id ? colorFor(me.id) : authorColor(author)
  }
  chat = new ChatPanel({ ext, me, editor, colorOf: colors })

  // -- connection status -------------------------------------------------------------------------
  let everConnected = false
  let unsent = false
  let terminal = null
  const renderStatus = () => {
    if (terminal) return setStatus('denied', terminal)
    if (!navigator.onLine) return setStatus('offline', unsent ? 'offline — your edits will merge on return' : 'offline')
    if (provider.wsconnected && provider.synced) return setStatus('connected', 'connected')
    if (provider.wsconnected) return setStatus('connecting', 'syncing…')
    if (!provider.shouldConnect) return setStatus('offline', unsent ? 'offline — your edits will merge on return' : 'offline')
    if (everConnected) return setStatus('reconnecting', unsent ? 'reconnecting… your edits will merge on return' : 'reconnecting…')
    return setStatus('connecting', 'connecting…')
  }
  provider.on('status', ({ status }) => {
    if (status === 'connected') everConnected = true
    renderStatus()
  })
  provider.on('sync', (synced) => {
    if (synced) {
      unsent = false
      ext.send({ type: 'undo.state', id: ext.nextId++ })
    }
    renderStatus()
  })
  provider.on('closed', ({ code, reason }) => {
    terminal = code === 4401 ? 'signed out: ' + (reason || 'token expired') : code === 4403 ? 'no access to this room' : `disconnected: ${reason || code}`
    renderStatus()
  })
  ydoc.on('update', (_update, origin) => {
    if (origin !== provider && !(provider.wsconnected && provider.synced)) {
      unsent = true
      renderStatus()
    }
  })
  window.addEventListener('online', renderStatus)
  window.addEventListener('offline', renderStatus)
  renderStatus()

  // -- links and invites ---------------------------------------------------------------------
  $('copy-link').onclick = async () => {
    const link = location.origin + roomUrl(room)
    try { await navigator.clipboard.writeText(link); toast('Room link copied') } catch { toast(link) }
  }
  setupInviteDialog(room)

  state.teardown = () => {
    chat.destroy()
    collaborators.destroy()
    editor.destroy()
    provider.destroy()
    ydoc.destroy()
  }
  window.collab = { room, ydoc, ytext, provider, ext, editor, view: editor.view, session, undoState, get readOnly () { return readOnly } }
}

const leaveRoom = () => {
  if (state.teardown) state.teardown()
  state.teardown = null
  state.room = null
}

const setupInviteDialog = (room) => {
  const dialog = $('invite-dialog')
  $('invite-room').textContent = room
  $('invite').onclick = () => {
    $('invite-result').hidden = true
    $('invite-link').value = ''
    $('invite-error').textContent = ''
    dialog.showModal()
  }
  $('invite-create').onclick = async () => {
    $('invite-error').textContent = ''
    try {
      const invite = await session.api(`/api/rooms/${roomPath(room)}/invites`, {
        method: 'POST',
        room,
        body: { role: $('invite-role').value, expires_in: Number($('invite-expiry').value) }
      })
      $('invite-link').value = invite.url
      $('invite-note').textContent = `Opens “${room}” as ${invite.role}; valid until ${new Date(invite.expires_at * 1000).toLocaleString()}.` +
        (session.mode === 'dev' ? ' (Open dev mode: roles are not enforced.)' : '')
      $('invite-result').hidden = false
      $('invite-link').select()
    } catch (err) {
      $('invite-error').textContent = err.message
    }
  }
  $('invite-copy').onclick = async () => {
    try { await navigator.clipboard.writeText($('invite-link').value); toast('Invite link copied') } catch { $('invite-link').select() }
  }
}

// -- invite landing page ---------------------------------------------------------------------------

const inviteLanding = async (code) => {
  let invite
  try {
    invite = await (await fetch(`/api/invites/${code}`)).json()
  } catch {
    invite = null
  }
  if (!invite || invite.error) {
    $('welcome').replaceChildren(h('h1', {}, 'Invite not found'), h('p', {}, 'This invite link is not valid.'))
    return
  }
  if (invite.expired) {
    $('welcome').replaceChildren(h('h1', {}, 'Invite expired'), h('p', {}, `The invite to “${invite.room}” has expired.`))
    return
  }
  await showLogin({
    text: `You are invited to “${invite.room}” as ${invite.role}. Your name:`,
    value: session.name,
    onSubmit: async (name) => { location.assign(`/invite/${code}?name=${encodeURIComponent(name)}`) }
  })
}

// -- start -------------------------------------------------------------------------------------------

const start = async () => {
  const route = parseRoute()
  setupSessionPanel()
  if (route.page === 'invite') {
    await inviteLanding(route.code)
    return
  }
  session.absorbUrl(route.room)
  await ensureLogin(route.room)
  if (route.page === 'room') state.room = route.room
  renderMe()
  const rooms = await loadRooms()
  if (route.page === 'room') await openRoom(route.room, rooms)
}

start().catch((err) => {
  console.error(err)
  toast(`Something went wrong: ${err.message}`, 'error')
})
